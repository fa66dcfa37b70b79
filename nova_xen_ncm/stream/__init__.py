"""Sans-I/O codec of the migration stream (no sockets, no files).

- :mod:`.decoder`: ``Decoder.feed(bytes)`` / ``next_record()`` returning a
  record, ``NEED_DATA`` or ``STREAM_END``; ``decode()`` for a whole stream.
- :mod:`.encoder`: ``Encoder`` returning buffer lists for vectored writes.
- :mod:`.libxc`, :mod:`.libxl`, :mod:`.xl`: Xen's layouts as data (struct
  formats, type numbers, body codecs), one module per layer.
- :mod:`.ncm`: the project's non-cooperative records.
- :mod:`.tables`: the record tables both directions use by default.
- :mod:`.records`, :mod:`.codecs`, :mod:`.errors`: what a record type is,
  reusable body codecs, and the one exception a bad stream raises.
"""
