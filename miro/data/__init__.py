"""Data: the sample schema, webdataset shard I/O, preprocessing stages and the training datamodule."""
