//! Template store: layered templates kept locally or in object storage, fetched lazily in chunks.
