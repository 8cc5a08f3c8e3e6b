"""S3: the resumable copier, input uploads and presigned URLs."""
