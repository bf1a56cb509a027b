"""Write: the Arrow schema, the Parquet shards and ``_MANIFEST.json`` (``WriteCorpus``)."""
