"""Object stores behind one small interface: what the output needs from S3, GCS or a local folder.

The output's commit protocol on object storage (``batchrun.output.remote``) asks a store for six
things, and nothing more::

    put(key, data)                      write an object whole (overwrites)
    put_if_absent(key, data)            create-if-absent: PreconditionFailed when the key exists
    put_if_match(key, data, version)    replace-if-unchanged: PreconditionFailed when it changed
    get(key) -> (bytes, version)        ObjectStoreError(key=...) with ``missing`` set when absent
    list(prefix) -> [ObjectInfo]        every object under a prefix (strongly consistent on S3 and GCS)
    delete(key)                         remove an object (absent: no error)

plus ``upload(key, path)`` for a Parquet part written on local disk. There is no rename and no append:
objects are written once, whole. :func:`open_store` turns an output URL into a store:

- ``s3://bucket/prefix`` and ``gs://bucket/prefix``: :class:`ObStore` (obstore, ``pip install 'batchrun[s3]'``),
  credentials and endpoint from the store's usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_REGION``, ``AWS_ENDPOINT_URL``; ``GOOGLE_APPLICATION_CREDENTIALS``...), never from the spec;
- ``hf://buckets/ORG/NAME/PREFIX``: :class:`HfBucketStore` (huggingface_hub and hf_xet), token and Hub from
  huggingface_hub's environment (``HF_TOKEN``, ``HF_ENDPOINT``); a bucket has no conditional write, so its
  ``conditional_writes`` is False (docs/object-storage.md);
- a local folder: :class:`FolderStore`, the same protocol on a file system (create-if-absent by ``link``,
  replace-if-unchanged under ``flock``), used by the tests of the protocol and by the benchmark.
"""

from batchrun.errors import OutputError
from batchrun.output.stores.base import SCHEMES, ObjectInfo, ObjectStore, Version, is_store_url, url_scheme
from batchrun.output.stores.folder import FolderStore

__all__ = ["FolderStore", "ObjectInfo", "ObjectStore", "Version", "is_store_url", "open_store"]


def open_store(url: str) -> ObjectStore:
    """The store an output URL names, configured from the environment (never from the spec)."""
    scheme = url_scheme(url)
    if scheme not in SCHEMES:
        raise OutputError(f"{url!r}: batchrun writes to {', '.join(f'{s}://' for s in SCHEMES)} or a local folder")
    if scheme == "hf":
        from batchrun.output.stores.hf_bucket import HfBucketStore

        return HfBucketStore(url)
    try:
        from batchrun.output.stores.cloud import ObStore
    except ImportError:
        raise OutputError(f"writing to {scheme}:// needs obstore: pip install 'batchrun[s3]'") from None
    return ObStore.from_url(url)
