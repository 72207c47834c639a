"""Running a detector: runtime selection, preprocessing, decoding, NMS."""
