"""Ingest archives from source channels (issue 5).

- archives: archive names, multi-part sets, completeness (pure);
- index: list an archive's contents (zip, 7z, rar), encrypted/corrupt detection;
- scan, download, pipeline, actor: the ingest engine (IngestActor).

Storage side: storage.ingest (IngestStore on Storage).
"""
