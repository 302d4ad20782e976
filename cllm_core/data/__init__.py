"""Data: prompt sources and chat templates, ingestion into Parquet, trajectory collection into verified shards, and
the trajectory store read back as training samples.
"""
