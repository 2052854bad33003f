"""Input pipelines and the data formats they read and write."""
