"""From a plan to a RowRequest: read the bytes a row plan points at (embeddings, masks, images).

Planning (`plan.py`) is cheap and runs on the driver; preparing reads files and the embedding store
and runs in Ray CPU tasks beside the GPU, so the generator only receives tensors and images.
"""

from __future__ import annotations

import torch

from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.generate import conditioning, faceid
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.plan import PlanError, RowPlan
from ipa_ops.store.dataset import EmbeddingStore
from ipa_ops.store.encoders import tiles as comfy_tiles
from ipa_ops.store.images import read_image


def prepare(plan: RowPlan, store: EmbeddingStore | None, max_pixels: int = 64_000_000) -> RowRequest:
    """Read what a plan points at (embeddings, masks, images) into a RowRequest."""
    req = RowRequest(**plan.request)
    w, h = req.width, req.height
    if plan.init_image:
        req.init_image = read_image(plan.init_image, max_pixels)[0].resize((w, h))
    if plan.mask_image:
        req.mask_image = read_image(plan.mask_image, max_pixels, mode="L")[0].resize((w, h))
    if plan.control_image:  # not resized here: the ControlNet pipeline resizes it as diffusers users get it
        req.control_image = read_image(plan.control_image, max_pixels)[0]
    for i, a in enumerate(plan.adapters):
        assert store is not None
        embeds = torch.stack(store.get(a.keys, field=a.field))
        if a.image_weights:  # ComfyUI's encoder weight: the image's embedding scaled, its negative not
            embeds = embeds * torch.tensor(a.image_weights, dtype=embeds.dtype).view(-1, *[1] * (embeds.ndim - 1))
        given = torch.stack(store.get(a.negative_keys, field=a.field)) if a.negative_keys else None
        unfold = bool((a.frames or {}).get("unfold"))
        if a.field == "face_embedding":  # portrait-unnorm's Resampler reads it as a one-token sequence
            embeds, given = embeds[:, None], given[:, None] if given is not None else None
        combined = embeds if unfold else conditioning.combine(embeds, a.combine)  # unfold: one image per frame
        # the raw face embedding's negative is zeros, as in ComfyUI (and diffusers' zeros_like for faces)
        uncond = torch.zeros_like(embeds[0]) if a.field == "face_embedding" else store.uncond(a.encoder, a.field)
        negative = conditioning.negatives(uncond, combined.shape[0], given, a.combine)
        masks = None
        if a.tiles:  # each tile attended alone on its region of the prepared image, stretched to the output
            inside = None
            if a.masks:  # the entry's own mask, carried through the image's crop and resizes
                user = read_image(a.masks[0], max_pixels, mode="L")[0]
                inside = comfy_tiles.mask_frame(user, *a.tiles["size"])
            boxes = [tuple(b) for b in a.tiles["boxes"]]
            regions = comfy_tiles.region_masks(tuple(a.tiles["frame"]), boxes, inside)
            masks = conditioning.preprocess_masks(regions, w, h, soft=a.soft_masks)
        elif a.masks:
            images = []
            for j, uri in enumerate(a.masks):
                mask = read_image(uri, max_pixels, mode="L")[0]
                if a.mask_fit is None and conditioning.aspect_mismatch(mask.size, w, h):
                    raise PlanError(
                        f"row {plan.id}: adapters[{i}].masks[{j}]: {uri} is {mask.size[0]}x{mask.size[1]}, "
                        f"not the aspect ratio of {w}x{h}; resize it or set mask_fit: pad or crop"
                    )
                images.append(conditioning.fit_mask(mask, w, h, a.mask_fit))
            masks = conditioning.preprocess_masks(images, w, h, soft=a.soft_masks)
        scaling = a.embeds_scaling or "V only"
        schedule = parse_schedule(a.scale)
        weights, slots = (a.frames or {}).get("weights"), (a.frames or {}).get("slots")
        req.adapters.append(
            AdapterInput(
                a.alias,
                combined,
                negative,
                schedule,
                masks,
                embeds_scaling=scaling,
                unfold=unfold,
                frame_weights=torch.tensor(weights, dtype=torch.float32) if weights is not None else None,
                frame_slots=torch.tensor(slots, dtype=torch.long) if slots is not None else None,
            )  # fmt: skip
        )
        if a.face is not None:
            faceid.attach(req.adapters[-1], a.face, a.combine, store)
    return req
