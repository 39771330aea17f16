"""Files: atomic writes, loading without executing code, image conversion, the sample store."""
