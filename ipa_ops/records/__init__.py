"""A row's record: the complete effective request an image was made from, as results columns
(schema.py: real Arrow structs and lists) and as metadata inside the image (metadata.py: the
AUTOMATIC1111 `parameters` text, an `ipa` iTXt chunk with the record as JSON, XMP with IPTC
DigitalSourceType; a GIF's comment).

A record is plain JSON-able data, so the generator, the image writer, `ipa reproduce` and
`ipa export` all read the same thing. Imports only `canonical` and the flow format.
"""
