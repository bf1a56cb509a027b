"""Read: TFRecord files cut into chunks and read as records or error rows (``ReadRecords``)."""
