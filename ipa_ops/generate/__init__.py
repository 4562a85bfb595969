"""The in-process generation core, no Ray: from a checked manifest row to an image.

contract.py    RowRequest / AdapterInput / RowOutput: what planning hands generation (imports no engine)
manifest_plan.py, plan.py   a manifest checked and keyed (driver); a plan prepared into a RowRequest
preflight.py, checkpoints.py  adapter / model / encoder checks from shapes and configs
families/      what differs per base model (SD1.5, SDXL) behind one protocol
generator.py   loads pipelines once, runs batches of rows as one diffusers call
attention.py   batched IP attention: per-row tokens, scales, masks (UNet; flux_attention.py, sd3_attention.py)
ip_state.py    what one call's rows want from the IP layers, settled once before the first step
tasks.py, faceid.py, loras.py, conditioning.py, payload.py   task pipelines, faces, LoRAs,
               combining embeddings and masks, the row codec between Ray stages
records.py     a row's record (its complete effective request), built while it is planned
reproduce.py   `ipa reproduce`: a row remade from its record, in the pipeline call it was made in

Imports flow, records, manifest, store and outputs; the stages above it are the only Ray code.
"""
