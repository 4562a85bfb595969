"""ComfyUI_IPAdapter_plus's IP-Adapter maths, written out for one row, as the tests' reference.

Transcribed from reading `IPAdapterPlus.py` (`ipadapter_execute`: weight types become an
{index: weight} dict, boosts, `percent_to_sigma`) and `CrossAttentionPatch.py`
(`ipadapter_attention`: the per-index profiles, the precise types' cond / uncond swap, the four
embeds scalings, sigma gating in `Attn2Replace`), in their control flow, independently of ipa's
code. `ComfyProcessor` runs it inside a stock diffusers pipeline for a single row (its batch is
[unconditional; conditional], as diffusers builds it), which is the unbatched reference path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# ComfyUI's transformer_index of each attention module, written out from its UNet's forward order
# (input blocks with cross attention, the middle block, the output blocks), as diffusers names them.
SD15_INDEX = {
    "down_blocks.0.attentions.0": 0,
    "down_blocks.0.attentions.1": 1,
    "down_blocks.1.attentions.0": 2,
    "down_blocks.1.attentions.1": 3,
    "down_blocks.2.attentions.0": 4,
    "down_blocks.2.attentions.1": 5,
    "mid_block.attentions.0": 6,
    **{f"up_blocks.{b}.attentions.{a}": 7 + 3 * (b - 1) + a for b in (1, 2, 3) for a in range(3)},
}
SDXL_INDEX = {
    "down_blocks.1.attentions.0": 0,
    "down_blocks.1.attentions.1": 1,
    "down_blocks.2.attentions.0": 2,
    "down_blocks.2.attentions.1": 3,
    "mid_block.attentions.0": 4,
    **{f"up_blocks.{b}.attentions.{a}": 5 + 3 * b + a for b in (0, 1) for a in range(3)},
}


def comfy_index(name: str, sdxl: bool) -> tuple[int, str]:
    """(transformer_index, block type) of a diffusers processor name."""
    module = name.split(".transformer_blocks.")[0]
    block = "input" if module.startswith("down") else "middle" if module.startswith("mid") else "output"
    return (SDXL_INDEX if sdxl else SD15_INDEX)[module], block


def execute_weight(weight_type: str, weight: float, sdxl: bool, composition: float = 1.0,
                   style_boost: float | None = None, composition_boost: float | None = None,
                   layer_weights: str | None = None) -> tuple[Any, str]:
    """`ipadapter_execute`'s weight and weight_type after its special weight types (a dict or a float)."""  # fmt: skip
    weight_composition = composition
    if style_boost is not None:
        weight_type = "style transfer precise"
    elif composition_boost is not None:
        weight_type = "composition precise"
    if layer_weights is not None and layer_weights != "":
        weight = {int(k): float(v) * weight for k, v in [x.split(":") for x in layer_weights.split(",")]}
        precise = weight_type == "style transfer precise" or weight_type == "composition precise"
        weight_type = weight_type if precise else "linear"
    elif weight_type == "style transfer":
        weight = {6: weight} if sdxl else {i: weight for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
    elif weight_type == "composition":
        weight = {3: weight} if sdxl else {4: weight * 0.25, 5: weight}
    elif weight_type == "strong style transfer":
        idx = (0, 1, 2, 4, 5, 6, 7, 8, 9, 10) if sdxl else (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
        weight = {i: weight for i in idx}
    elif weight_type == "style and composition":
        if sdxl:
            weight = {3: weight_composition, 6: weight}
        else:
            weight = {**{i: weight for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)},
                      4: weight_composition * 0.25, 5: weight_composition}  # fmt: skip
    elif weight_type == "strong style and composition":
        if sdxl:
            weight = {0: weight, 1: weight, 2: weight, 3: weight_composition, 4: weight, 5: weight, 6: weight,
                      7: weight, 8: weight, 9: weight, 10: weight}  # fmt: skip
        else:
            weight = {**{i: weight for i in range(16)}, 4: weight_composition, 5: weight_composition}
    elif weight_type == "style transfer precise":
        weight_composition = style_boost if style_boost is not None else weight
        if sdxl:
            weight = {3: weight_composition, 6: weight}
        else:
            weight = {**{i: weight for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)},
                      4: weight_composition * 0.25, 5: weight_composition}  # fmt: skip
    elif weight_type == "composition precise":
        weight_composition = weight
        weight = composition_boost if composition_boost is not None else weight
        if sdxl:
            weight = {0: weight * .1, 1: weight * .1, 2: weight * .1, 3: weight_composition, 4: weight * .1,
                      5: weight * .1, 6: weight, 7: weight * .1, 8: weight * .1, 9: weight * .1,
                      10: weight * .1}  # fmt: skip
        else:
            weight = {0: weight, 1: weight, 2: weight, 3: weight, 4: weight_composition * 0.25,
                      5: weight_composition, 6: weight * .1, 7: weight * .1, 8: weight * .1, 9: weight,
                      10: weight, 11: weight, 12: weight, 13: weight, 14: weight, 15: weight}  # fmt: skip
    return weight, weight_type


def attention_weight(weight: Any, weight_type: str, t_idx: int, block_type: str, sdxl: bool) -> tuple[float, bool]:
    """`ipadapter_attention`'s weight at one layer, and whether it swaps cond into uncond there."""
    layers = 11 if sdxl else 16
    swap = False
    if weight_type == "ease in":
        weight = weight * (0.05 + 0.95 * (1 - t_idx / layers))
    elif weight_type == "ease out":
        weight = weight * (0.05 + 0.95 * (t_idx / layers))
    elif weight_type == "ease in-out":
        weight = weight * (0.05 + 0.95 * (1 - abs(t_idx - (layers / 2)) / (layers / 2)))
    elif weight_type == "reverse in-out":
        weight = weight * (0.05 + 0.95 * (abs(t_idx - (layers / 2)) / (layers / 2)))
    elif weight_type == "weak input" and block_type == "input":
        weight = weight * 0.2
    elif weight_type == "weak middle" and block_type == "middle":
        weight = weight * 0.2
    elif weight_type == "weak output" and block_type == "output":
        weight = weight * 0.2
    elif weight_type == "strong middle" and (block_type == "input" or block_type == "output"):
        weight = weight * 0.2
    elif isinstance(weight, dict):
        if t_idx not in weight:
            return 0.0, False
        if weight_type == "style transfer precise":
            swap = (layers == 11 and t_idx == 3) or (layers == 16 and t_idx in (4, 5))
        elif weight_type == "composition precise":
            swap = (layers == 11 and t_idx != 3) or (layers == 16 and t_idx not in (4, 5))
        weight = weight[t_idx]
    return float(weight), swap


def comfy_sigma(timestep: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ModelSamplingDiscrete.sigma."""
    t = torch.clamp(timestep.float(), min=0, max=len(log_sigmas) - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def percent_to_sigma(percent: float, log_sigmas: torch.Tensor) -> float:
    """ComfyUI's ModelSamplingDiscrete.percent_to_sigma."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return comfy_sigma(torch.tensor((1.0 - percent) * 999.0), log_sigmas).item()


class ComfyRow:
    """One row's ComfyUI settings for one adapter, and the sampler's current sigma."""

    def __init__(self, weight_type: str = "linear", weight: float = 1.0, sdxl: bool = False,
                 embeds_scaling: str = "V only", start_at: float = 0.0, end_at: float = 1.0,
                 log_sigmas: torch.Tensor | None = None, images: int = 1, mask: torch.Tensor | None = None,
                 **boosts: Any):  # fmt: skip
        # images: how many of the adapter's images this application (one IPAdapter node) attends;
        # mask: its [1, H, W] region, weighting its output as diffusers' IPAdapterMaskProcessor downsamples it
        self.images, self.mask = images, mask
        self.weight, self.weight_type = execute_weight(weight_type, weight, sdxl, **boosts)
        self.sdxl, self.embeds_scaling = sdxl, embeds_scaling
        self.sigma_start = percent_to_sigma(start_at, log_sigmas) if log_sigmas is not None else 999999999.9
        self.sigma_end = percent_to_sigma(end_at, log_sigmas) if log_sigmas is not None else 0.0
        self.log_sigmas = log_sigmas
        self.sigma = 999999999.9

    def hook(self, unet: Any) -> Any:
        """A UNet pre-hook that reads each step's sigma off its timestep, as ComfyUI's sampler knows it."""

        def read(_module: Any, args: Any, kwargs: Any) -> None:
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            if self.log_sigmas is not None:
                self.sigma = comfy_sigma(torch.as_tensor(timestep).reshape(-1)[:1], self.log_sigmas).item()

        return unet.register_forward_pre_hook(read, with_kwargs=True)


class ComfyProcessor(torch.nn.Module):
    """Cross attention plus `ipadapter_attention` for a single-row CFG batch [uncond; cond].

    Several ComfyRows are several patches of one adapter (IPAdapterRegionalConditioning +
    IPAdapterCombineParams, or chained nodes): `Attn2Replace` adds each callback's output in turn,
    each gated on its own sigma window, attending its own images."""

    def __init__(self, name: str, to_k_ip: torch.nn.Module, to_v_ip: torch.nn.Module, rows: list[ComfyRow]):
        super().__init__()
        self.t_idx, self.block_type = comfy_index(name, rows[0].sdxl)
        self.to_k_ip, self.to_v_ip, self.rows = to_k_ip, to_v_ip, rows

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, **_: Any) -> torch.Tensor:  # fmt: skip
        text, (ip_tokens,) = encoder_hidden_states
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        heads = attn.heads

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # optimized_attention
            split = [x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k, v)]
            return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(q.shape[0], -1, q.shape[-1])

        out = attend(query, attn.to_k(text), attn.to_v(text))
        first = 0
        for row in self.rows:
            tokens = ip_tokens[:, first : first + row.images]
            first += row.images
            if row.sigma <= row.sigma_start and row.sigma >= row.sigma_end:
                ip = self._ip(query, tokens.reshape(batch, -1, ip_tokens.shape[-1]), attend, row)
                if row.mask is not None:
                    from diffusers.image_processor import IPAdapterMaskProcessor

                    ip = ip * IPAdapterMaskProcessor.downsample(row.mask, batch, ip.shape[1], 1)
                out = out + ip
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor

    def _ip(self, q: torch.Tensor, tokens: torch.Tensor, attend: Any, row: ComfyRow) -> torch.Tensor:
        weight, swap = attention_weight(row.weight, row.weight_type, self.t_idx, self.block_type, row.sdxl)
        uncond, cond = tokens.chunk(2) if tokens.shape[0] == 2 else (tokens[:0], tokens)
        if swap:
            uncond, cond = cond, cond * 0
        if weight == 0:
            return torch.zeros_like(q)
        halves = [(self.to_k_ip(uncond), self.to_v_ip(uncond))] if uncond.shape[0] else []
        halves.append((self.to_k_ip(cond), self.to_v_ip(cond)))
        ip_k, ip_v = torch.cat([k for k, _ in halves]), torch.cat([v for _, v in halves])
        if row.embeds_scaling == "K+mean(V) w/ C penalty":
            weight = weight * float(ip_k.shape[2]) / 1280.0
            ip_k = ip_k * weight
            mean = torch.mean(ip_v, dim=1, keepdim=True)
            return attend(q, ip_k, (ip_v - mean) + mean * weight)
        if row.embeds_scaling == "K+V w/ C penalty":
            weight = weight * float(ip_k.shape[2]) / 1280.0
            return attend(q, ip_k * weight, ip_v * weight)
        if row.embeds_scaling == "K+V":
            return attend(q, ip_k * weight, ip_v * weight)
        return attend(q, ip_k, ip_v) * weight


def run(pipe: Any, row: ComfyRow | list[ComfyRow], **call: Any) -> Any:
    """`pipe(**call)` with its IP processors (one adapter) swapped for ComfyProcessor, then restored;
    a list of rows applies the adapter once per row, each to its own `images` of the adapter's images."""
    rows = row if isinstance(row, list) else [row]
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    original = dict(pipe.unet.attn_processors)
    procs = {}
    for name, proc in original.items():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc = ComfyProcessor(name, proc.to_k_ip[0], proc.to_v_ip[0], rows)
        procs[name] = proc
    pipe.unet.set_attn_processor(procs)
    hooks = [r.hook(pipe.unet) for r in rows]
    try:
        return pipe(**call)
    finally:
        for hook in hooks:
            hook.remove()
        pipe.unet.set_attn_processor(original)


def combine_embeds(embeds: torch.Tensor, method: str) -> torch.Tensor:
    """IPAdapterCombineEmbeds.batch (and ipadapter_execute's combine_embeds) on [n, ...] embeddings."""
    if method == "add":
        return torch.sum(embeds, dim=0).unsqueeze(0)
    if method == "subtract":
        return (embeds[0] - torch.mean(embeds[1:], dim=0)).unsqueeze(0)
    if method == "average":
        return torch.mean(embeds, dim=0).unsqueeze(0)
    if method == "norm average":
        return torch.mean(embeds / torch.norm(embeds, dim=0, keepdim=True), dim=0).unsqueeze(0)
    if method == "max":
        return torch.max(embeds, dim=0).values.unsqueeze(0)
    if method == "min":
        return torch.min(embeds, dim=0).values.unsqueeze(0)
    return embeds


def make_noise(kind: str, strength: float, blur: int, image_optional: torch.Tensor | None = None) -> torch.Tensor:
    """IPAdapterNoise.make_noise on ComfyUI's [1, H, W, 3] float image, with its global-generator draws on the
    tensors' own layouts (`rand_like` keeps strides); torchvision's transforms written out in plain torch."""
    if image_optional is None:
        image = torch.zeros([1, 224, 224, 3])
    else:
        chw = image_optional.permute([0, 3, 1, 2])
        side = min(chw.shape[2], chw.shape[3])
        top, left = int(round((chw.shape[2] - side) / 2.0)), int(round((chw.shape[3] - side) / 2.0))
        chw = chw[:, :, top : top + side, left : left + side]
        if side != 224:
            chw = F.interpolate(chw, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
        image = chw.permute([0, 2, 3, 1])
    seed = int(torch.sum(image).item()) % 1000000007
    torch.manual_seed(seed)
    if kind == "fade":
        noise = torch.rand_like(image)
        noise = image * (1 - strength) + noise * strength
    elif kind == "dissolve":
        mask = (torch.rand_like(image) < strength).float()
        noise = torch.rand_like(image)
        noise = image * (1 - mask) + noise * mask
    elif kind == "gaussian":
        noise = torch.randn_like(image) * strength
        noise = image + noise
    else:
        image = _elastic(image.permute([0, 3, 1, 2]), 75.0, (1 - strength) * 3.5)
        image = image.flip(-2) if torch.rand(1) < 1.0 else image
        image = image.flip(-1) if torch.rand(1) < 1.0 else image
        image = image.permute([0, 2, 3, 1])
        noise = torch.randn_like(image) * (strength * 0.75)
        noise = image * (1 - noise) + noise
    noise = torch.clamp(noise, 0, 1)
    if blur > 0:
        if blur % 2 == 0:
            blur += 1
        noise = _blur(noise.permute([0, 3, 1, 2]), blur, blur * 0.15 + 0.35).permute([0, 2, 3, 1])
    return noise


def _blur(image: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur (rows, then columns), reflect padding: torchvision's gaussian_blur."""
    x = torch.arange(size, dtype=image.dtype) - (size - 1) / 2
    line = torch.exp(-0.5 * (x / sigma) ** 2)
    line = line / line.sum()
    channels = image.shape[1]
    padded = F.pad(image, [size // 2] * 4, mode="reflect")
    rows = F.conv2d(padded, line.view(1, 1, 1, size).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, line.view(1, 1, size, 1).repeat(channels, 1, 1, 1), groups=channels)


def _elastic(image: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """torchvision's ElasticTransform(alpha, sigma) with fill 0: random displacements, blurred, then a bilinear warp."""
    _, _, h, w = image.shape
    fields = []
    for extent in (w, h):
        d = torch.rand([1, 1, h, w]) * 2 - 1
        if sigma > 0.0:
            k = int(8 * sigma + 1)
            d = _blur(d, k if k % 2 else k + 1, sigma)
        fields.append(d * alpha / extent)
    identity = F.affine_grid(torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]), [1, 1, h, w], align_corners=False)
    grid = identity + torch.cat(fields, 1).permute([0, 2, 3, 1])
    inside = F.grid_sample(torch.ones(1, 1, h, w), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped * inside
