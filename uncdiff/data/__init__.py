"""Data: the image sets, the masks and degradations of the image-to-image tasks, and the per-sample keys
that make each pair reproducible. Plain tensor and numpy code without Lightning; it reads no files of
the user's (that is `uncdiff.io`)."""
