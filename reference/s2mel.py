"""IndexTTS-2 semantic-to-mel model (``s2mel.safetensors``): the GPT-latent MLP, the
length regulator and one call of the flow-matching velocity estimator (a DiT with a
WaveNet head).

Entry points (``ENTRIES``):

- ``gpt_layer(w, latent)``: ``[B, T, gpt_layer_dims[0]] -> [B, T, gpt_layer_dims[-1]]``,
  three Linears with no activation between (``gpt_layer.{g}``).
- ``length_regulator(w, x, ylens)``: content ``[B, T_in, length_regulator_in_channels]``
  -> frame-rate condition ``[B, max(ylens), length_regulator_channels]``, zero past each
  item's ``ylens`` (``length_regulator.*``).
- ``dit(w, x, prompt_x, x_lens, t, style, cond)``: the velocity ``[B, in_channels, T]``
  for noisy mel ``x`` ``[B, in_channels, T]``, prompt mel ``prompt_x`` (same shape, zero
  past the prompt), valid lengths ``x_lens`` ``[B]`` (or ``[1]``, broadcast), flow time
  ``t`` ``[B]``, speaker style ``[B, style_dim]`` and content ``cond``
  ``[B, T, content_dim]`` (``cfm.estimator.*``).

Tensors, by group (see ``canonical_schema.json`` ``models.s2mel`` for shapes):

- ``cfm.estimator.t_embedder.{freqs, mlp.0, mlp.2}``, ``t_embedder2.*``: sinusoidal
  timestep embedders (transformer / WaveNet width).
- ``cfm.estimator.cond_projection``, ``cond_x_merge_linear``: the input merge.
- ``cfm.estimator.transformer.layers.{l}.``: ``attention_norm`` / ``ffn_norm``
  (adaptive RMSNorm: ``norm.weight``, ``scale_proj``, ``shift_proj``),
  ``attention.{q,k,v,wo}``, ``feed_forward.{w1,w2,w3}``, ``skip_in_linear`` (U-ViT, only
  where ``uvit_skip_from[l] >= 0``); ``transformer.norm`` after the last layer.
- ``cfm.estimator.skip_linear`` (when ``long_skip_connection``), ``conv1``,
  ``res_projection``, ``wavenet.in_layers.{w}.{filter,gate}``,
  ``wavenet.cond_layer.{w}.{filter,gate}``, ``wavenet.res_skip_layers.{w}.{res,skip}``,
  ``final_layer.{shift_proj, scale_proj, linear}``, ``conv2``.
- ``length_regulator.content_in_proj``, ``length_regulator.blocks.{b}.{conv,norm}``,
  ``length_regulator.out_proj``.

Activations recorded: ``gpt_layer.{g}``, ``length_regulator.{b}`` (after block b),
``transformer.{l}`` (after transformer layer l, before the final norm), ``wavenet.{w}``
(the sum of the WaveNet skip outputs of layers 0..w, before the output mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .entry import Entry, record

E = "cfm.estimator."
TR = E + "transformer."
WN = E + "wavenet."
LR = "length_regulator."


# ------------------------------------------------------------------ small pieces


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def silu(x):
    return x * torch.sigmoid(x)


def mish(x):
    return x * torch.tanh(F.softplus(x))


def length_mask(lengths, n):
    """``[len(lengths), n]`` bool: frame i of item b is valid when i < lengths[b]."""
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


# ------------------------------------------------------------------ gpt_layer


def gpt_layer(w, latent, acts=None):
    """The GPT latent MLP: Linear after Linear, no activation."""
    h = latent
    for g in range(len(w.config["gpt_layer_dims"]) - 1):
        h = linear(h, w[f"gpt_layer.{g}.weight"], w[f"gpt_layer.{g}.bias"])
        record(acts, f"gpt_layer.{g}", h)
    return h


# ------------------------------------------------------------------ length regulator


def nearest_indices(n_in: int, n_out: int) -> torch.Tensor:
    """Source frame of each output frame for nearest resizing n_in -> n_out:
    ``floor(j * (n_in / n_out))`` with the ratio and the product in float32, capped at
    n_in - 1 (PyTorch's ``interpolate(mode="nearest")``, which upstream calls)."""
    if n_out == n_in:
        return torch.arange(n_out)
    if n_out == 2 * n_in:
        return torch.arange(n_out) // 2
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    idx = torch.floor(torch.arange(n_out, dtype=torch.float32) * scale).long()
    return idx.clamp(max=n_in - 1)


def group_norm(x, groups: int, weight, bias, eps: float):
    """x ``[B, C, T]``: normalise each group of C / groups channels over channels and
    time together (biased variance), then a per-channel gain and bias."""
    B, C, T = x.shape
    g = x.reshape(B, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    g = (g - mean) / torch.sqrt(var + eps)
    return g.reshape(B, C, T) * weight[None, :, None] + bias[None, :, None]


def length_regulator(w, x, ylens, acts=None):
    """Content ``[B, T_in, in]`` -> condition ``[B, max(ylens), channels]``.

    Every item is resized to ``max(ylens)`` frames (not to its own length) before the
    conv blocks, and only the output is masked by its own length."""
    cfg = w.config
    n_blocks = len(cfg["length_regulator_sampling_ratios"])
    if cfg["length_regulator_interpolate"] != "nearest":
        raise ValueError(f"length_regulator_interpolate {cfg['length_regulator_interpolate']!r} is not supported")
    h = linear(x, w[f"{LR}content_in_proj.weight"], w[f"{LR}content_in_proj.bias"])
    h = h.transpose(1, 2)  # [B, C, T_in]
    if n_blocks > 0:
        n_out = int(ylens.max())
        h = h[:, :, nearest_indices(h.shape[2], n_out)]
    mask = length_mask(ylens, h.shape[2])  # [B, T]
    for b in range(n_blocks):
        weight = w[f"{LR}blocks.{b}.conv.weight"]  # [C, C, k]
        h = F.conv1d(h, weight, w[f"{LR}blocks.{b}.conv.bias"], padding=weight.shape[2] // 2)
        h = group_norm(h, cfg["length_regulator_groups"], w[f"{LR}blocks.{b}.norm.weight"],
                       w[f"{LR}blocks.{b}.norm.bias"], cfg["length_regulator_norm_eps"])
        h = mish(h)
        record(acts, f"length_regulator.{b}", h.transpose(1, 2))
    out = linear(h.transpose(1, 2), w[f"{LR}out_proj.weight"], w[f"{LR}out_proj.bias"])
    return out * mask[:, :, None]


# ------------------------------------------------------------------ DiT pieces


def timestep_embedding(w, name: str, t):
    """``mlp.2(silu(mlp.0([cos(a), sin(a)])))``, ``a = timestep_scale * t * freqs``."""
    cfg = w.config
    a = cfg["timestep_scale"] * t.float()[:, None] * w[f"{E}{name}.freqs"][None, :]
    emb = torch.cat([torch.cos(a), torch.sin(a)], dim=-1)
    if cfg["timestep_freq_dim"] % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    h = silu(linear(emb, w[f"{E}{name}.mlp.0.weight"], w[f"{E}{name}.mlp.0.bias"]))
    return linear(h, w[f"{E}{name}.mlp.2.weight"], w[f"{E}{name}.mlp.2.bias"])


def adaptive_rms_norm(w, p: str, x, c, eps: float):
    """``scale_proj(c) * rmsnorm(x) * norm.weight + shift_proj(c)``; c ``[B, 1, D]``."""
    n = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w[f"{p}.norm.weight"]
    scale = linear(c, w[f"{p}.scale_proj.weight"], w[f"{p}.scale_proj.bias"])
    shift = linear(c, w[f"{p}.shift_proj.weight"], w[f"{p}.shift_proj.bias"])
    return scale * n + shift


def rope_cos_sin(T: int, head_dim: int, base: float, device=None):
    """cos and sin ``[T, head_dim // 2]`` of angle ``pos * base ** (-2i / head_dim)``."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    ang = torch.outer(torch.arange(T, device=device).float(), inv)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x, cos, sin):
    """x ``[B, T, H, D]``: rotate each interleaved pair (x[2i], x[2i+1])."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(3)


def attention(w, p: str, x, cos, sin, allowed):
    """Multi-head self-attention with rotary q/k; ``allowed`` is broadcastable to
    ``[B, H, T, T]`` (True = the query may attend the key)."""
    cfg = w.config
    B, T, _ = x.shape
    H, Hkv, D = cfg["num_heads"], cfg["n_local_heads"], cfg["head_dim"]
    q = linear(x, w[f"{p}.q.weight"]).view(B, T, H, D)
    k = linear(x, w[f"{p}.k.weight"]).view(B, T, Hkv, D)
    v = linear(x, w[f"{p}.v.weight"]).view(B, T, Hkv, D)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, D]
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    y = y.transpose(1, 2).reshape(B, T, H * D)
    return linear(y, w[f"{p}.wo.weight"])


def feed_forward(w, p: str, x):
    gate = silu(linear(x, w[f"{p}.w1.weight"]))
    return linear(gate * linear(x, w[f"{p}.w3.weight"]), w[f"{p}.w2.weight"])


def transformer(w, x, c, x_mask, acts=None):
    """The gpt_fast stack with adaptive norms conditioned on ``c`` ``[B, 1, D]``, U-ViT
    skips per ``uvit_skip_from`` and the final adaptive norm."""
    cfg = w.config
    T = x.shape[1]
    if T > cfg["block_size"]:
        raise ValueError(f"{T} frames exceed block_size {cfg['block_size']} (rotary positions)")
    cos, sin = rope_cos_sin(T, cfg["head_dim"], cfg["rope_base"], x.device)
    if cfg["is_causal"]:
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]  # lengths are not applied
    else:
        allowed = x_mask[:, None, None, :]  # padded keys are never attended
    eps = cfg["norm_eps"]
    outputs = []
    for l in range(cfg["depth"]):
        p = f"{TR}layers.{l}"
        src = cfg["uvit_skip_from"][l]
        if src >= 0:
            x = linear(torch.cat([x, outputs[src]], dim=-1), w[f"{p}.skip_in_linear.weight"], w[f"{p}.skip_in_linear.bias"])
        h = x + attention(w, f"{p}.attention", adaptive_rms_norm(w, f"{p}.attention_norm", x, c, eps), cos, sin, allowed)
        x = h + feed_forward(w, f"{p}.feed_forward", adaptive_rms_norm(w, f"{p}.ffn_norm", h, c, eps))
        outputs.append(x)
        record(acts, f"transformer.{l}", x)
    return adaptive_rms_norm(w, f"{TR}norm", x, c, eps)


def reflect_pad(x, left: int, right: int):
    """Reflect padding of x ``[B, C, n]`` (edge not repeated).  When n is not longer
    than the larger side, x is first extended with zeros to max(left, right) + 1
    frames, reflected, and the extension cut off again (upstream's pad1d)."""
    n = x.shape[-1]
    extra = max(0, max(left, right) - n + 1)
    if extra:
        x = torch.cat([x, x.new_zeros(*x.shape[:-1], extra)], dim=-1)
    m = n + extra
    j = torch.arange(-left, n + right, device=x.device).abs()
    j = torch.where(j >= m, 2 * (m - 1) - j, j)
    return x[..., j]


def pointwise(x, weight, bias):
    """A kernel-1 Conv1d stored as a Linear: x ``[B, C_in, T]`` -> ``[B, C_out, T]``."""
    return torch.einsum("oc,bct->bot", weight, x) + bias[None, :, None]


def wavenet(w, x, x_mask, g, acts=None):
    """Gated dilated WaveNet on x ``[B, h, T]`` conditioned on g ``[B, h]``; returns the
    masked sum of the layers' skip outputs."""
    cfg = w.config
    if cfg["wavenet_pad_mode"] != "reflect":
        raise ValueError(f"wavenet_pad_mode {cfg['wavenet_pad_mode']!r} is not supported")
    L, k = cfg["wavenet_num_layers"], cfg["wavenet_kernel_size"]
    mask = x_mask[:, None, :].to(x.dtype)
    out = torch.zeros_like(x)
    for i in range(L):
        p = f"{WN}in_layers.{i}"
        dilation = cfg["wavenet_dilation_rate"] ** i
        total = (k - 1) * dilation
        xp = reflect_pad(x, total - total // 2, total // 2)
        filt = F.conv1d(xp, w[f"{p}.filter.weight"], w[f"{p}.filter.bias"], dilation=dilation)
        gate = F.conv1d(xp, w[f"{p}.gate.weight"], w[f"{p}.gate.bias"], dilation=dilation)
        c = f"{WN}cond_layer.{i}"
        filt = filt + linear(g, w[f"{c}.filter.weight"], w[f"{c}.filter.bias"])[:, :, None]
        gate = gate + linear(g, w[f"{c}.gate.weight"], w[f"{c}.gate.bias"])[:, :, None]
        a = torch.tanh(filt) * torch.sigmoid(gate)
        r = f"{WN}res_skip_layers.{i}"
        if i < L - 1:
            x = (x + pointwise(a, w[f"{r}.res.weight"], w[f"{r}.res.bias"])) * mask
        out = out + pointwise(a, w[f"{r}.skip.weight"], w[f"{r}.skip.bias"])
        record(acts, f"wavenet.{i}", out)
    return out * mask


def final_layer(w, x, t1, eps: float):
    """``linear(layernorm(x) * (1 + scale) + shift)``, shift/scale from silu(t1)."""
    c = silu(t1)
    shift = linear(c, w[f"{E}final_layer.shift_proj.weight"], w[f"{E}final_layer.shift_proj.bias"])
    scale = linear(c, w[f"{E}final_layer.scale_proj.weight"], w[f"{E}final_layer.scale_proj.bias"])
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    n = (x - mean) / torch.sqrt(var + eps)
    n = n * (1 + scale[:, None, :]) + shift[:, None, :]
    return linear(n, w[f"{E}final_layer.linear.weight"], w[f"{E}final_layer.linear.bias"])


def dit(w, x, prompt_x, x_lens, t, style, cond, acts=None):
    """One estimator call: velocity ``[B, in_channels, T]``."""
    cfg = w.config
    for key, want in (("time_as_token", False), ("style_as_token", False), ("final_layer_type", "wavenet")):
        if cfg[key] != want:
            raise ValueError(f"s2mel config {key} = {cfg[key]!r} is not supported (expected {want!r})")
    B, _, T = x.shape
    t1 = timestep_embedding(w, "t_embedder", t)  # [B, D]
    content = linear(cond, w[f"{E}cond_projection.weight"], w[f"{E}cond_projection.bias"])
    x_t = x.transpose(1, 2)  # [B, T, in_channels]
    parts = [x_t, prompt_x.transpose(1, 2), content]
    if cfg["style_condition"]:
        parts.append(style[:, None, :].expand(B, T, style.shape[-1]))
    h = linear(torch.cat(parts, dim=-1), w[f"{E}cond_x_merge_linear.weight"], w[f"{E}cond_x_merge_linear.bias"])
    x_mask = length_mask(x_lens, T)  # [B or 1, T]
    h = transformer(w, h, t1[:, None, :], x_mask, acts)
    if cfg["long_skip_connection"]:
        h = linear(torch.cat([h, x_t], dim=-1), w[f"{E}skip_linear.weight"], w[f"{E}skip_linear.bias"])
    # WaveNet head
    y = linear(h, w[f"{E}conv1.weight"], w[f"{E}conv1.bias"]).transpose(1, 2)  # [B, h, T]
    t2 = timestep_embedding(w, "t_embedder2", t)
    y = wavenet(w, y, x_mask, t2, acts).transpose(1, 2)
    y = y + linear(h, w[f"{E}res_projection.weight"], w[f"{E}res_projection.bias"])
    y = final_layer(w, y, t1, cfg["final_norm_eps"])
    return linear(y, w[f"{E}conv2.weight"], w[f"{E}conv2.bias"]).transpose(1, 2)


def cfm_inference(w, cond, prompt_mel, style, noise, steps: int, cfg_rate: float, acts=None):
    """The flow-matching sampler as upstream's ``CFM.inference`` / ``solve_euler`` runs it:
    mel ``[1, in_channels, T]`` from the content ``cond`` ``[1, T, content_dim]`` (prompt
    frames first), the prompt mel ``[1, in_channels, T_prompt]``, ``style`` and the noise
    ``x_0`` ``[1, in_channels, T]``.

    ``prompt_x`` is the prompt mel in its first ``T_prompt`` frames and zero after; ``x``
    starts as the noise with its prompt frames zeroed, and they are zeroed again after
    every step.  Euler over ``steps`` steps of ``linspace(0, 1, steps + 1)``, where ``t``
    is accumulated (``t += dt``, float32) rather than read from the grid.  With
    ``cfg_rate > 0`` each step runs the estimator on a batch of two, the second with
    zero ``prompt_x``, zero style and zero content, and takes
    ``(1 + cfg_rate) * v_cond - cfg_rate * v_uncond``.  ``acts["step.<k>"]``: ``x``
    after step k."""
    T = cond.shape[1]
    n_prompt = prompt_mel.shape[-1]
    x = noise.clone()
    prompt_x = torch.zeros_like(x)
    prompt_x[..., :n_prompt] = prompt_mel[..., :n_prompt]
    x[..., :n_prompt] = 0
    x_lens = torch.tensor([T], dtype=torch.int64, device=cond.device)
    grid = torch.linspace(0, 1, steps + 1, device=cond.device)
    t = grid[0]
    for k in range(1, steps + 1):
        dt = grid[k] - grid[k - 1]
        if cfg_rate > 0:
            v = dit(w, torch.cat([x, x]), torch.cat([prompt_x, torch.zeros_like(prompt_x)]), x_lens,
                    torch.stack([t, t]), torch.cat([style, torch.zeros_like(style)]),
                    torch.cat([cond, torch.zeros_like(cond)]))
            v_cond, v_uncond = v.chunk(2, dim=0)
            v = (1.0 + cfg_rate) * v_cond - cfg_rate * v_uncond
        else:
            v = dit(w, x, prompt_x, x_lens, t.unsqueeze(0), style, cond)
        x = x + dt * v
        t = t + dt
        x[:, :, :n_prompt] = 0
        record(acts, f"step.{k}", x)
    return x


# ------------------------------------------------------------------ entry points


def _gpt_layer_inputs(cfg, g):
    return {"latent": torch.randn(1, 12, cfg["gpt_layer_dims"][0], generator=g)}


def _length_regulator_inputs(cfg, g):
    # 10 content frames resized to 23 (both items: upstream resizes to max(ylens)), the
    # second item masked after 17
    return {"x": torch.randn(2, 10, cfg["length_regulator_in_channels"], generator=g),
            "ylens": torch.tensor([23, 17], dtype=torch.int64)}


def _dit_inputs(cfg, g):
    B, T, C, prompt = 2, 24, cfg["in_channels"], 8
    x = torch.randn(B, C, T, generator=g)
    x[..., :prompt] = 0  # CFM zeroes the prompt region of x_t
    prompt_x = torch.zeros(B, C, T)
    prompt_x[..., :prompt] = torch.randn(B, C, prompt, generator=g)
    return {"x": x, "prompt_x": prompt_x,
            "x_lens": torch.tensor([T, T - 5], dtype=torch.int64),
            "t": torch.rand(B, generator=g),
            "style": torch.randn(B, cfg["style_dim"], generator=g),
            "cond": torch.randn(B, T, cfg["content_dim"], generator=g)}


ENTRIES = (
    Entry("gpt_layer", "MyModel.models['gpt_layer'](latent)",
          ("latent",), ("out",), _gpt_layer_inputs,
          lambda w, acts, latent: {"out": gpt_layer(w, latent, acts)}),
    Entry("length_regulator", "MyModel.models['length_regulator'](x, ylens=ylens, n_quantizers=3, f0=None)[0]",
          ("x", "ylens"), ("cond",), _length_regulator_inputs,
          lambda w, acts, x, ylens: {"cond": length_regulator(w, x, ylens, acts)}),
    Entry("dit", "MyModel.models['cfm'].estimator(x, prompt_x, x_lens, t, style, cond) (DiT.forward, as CFM.solve_euler calls it)",
          ("x", "prompt_x", "x_lens", "t", "style", "cond"), ("dphi_dt",), _dit_inputs,
          lambda w, acts, x, prompt_x, x_lens, t, style, cond: {"dphi_dt": dit(w, x, prompt_x, x_lens, t, style, cond, acts)}),
)
