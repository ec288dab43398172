"""The encoder and its masked-language-modelling head: BERT's architecture with RoBERTa's choices.

Read top-down: ModelDims -> Embeddings -> SelfAttention -> FeedForward -> EncoderLayer -> Encoder -> MLMHead
-> MaskedLM. Shapes use B = batch, T = tokens per row, H = hidden size, nh = heads, hs = head size,
V = vocabulary, N = predicted (masked) positions, N_tokens = real tokens. The layers run over either layout
of `layouts.py`: padded rows (B, T, H) or the real tokens packed, (N_tokens, H); the fast dropout, attention
and fused loss they call are in `kernels.py`.

RoBERTa's choices by default: learned absolute positions counted from `pad_id + 1` (pads sit at position
`pad_id`), a single token type, GELU, post-LN blocks (pre-LN as an option), input and output
embeddings tied, an MLM head dense -> GELU -> LayerNorm -> decoder with its own bias. BERT's are options
on the same classes (positions counted from 0, two token types), ModernBERT's too (rotary positions, GeGLU,
pre-LN, local attention, no biases): `families/` names each family's settings.

Parameter names and shapes map one-to-one onto each family's Hugging Face class, so an export is a
renaming (`hf.py`, with each family's table in `families/`): `embeddings.word_embeddings` <->
`roberta.embeddings.word_embeddings`, `encoder.layers.0.attention.query` <->
`roberta.encoder.layer.0.attention.self.query`, and so on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoder_train.batch import IGNORE_INDEX
from encoder_train.errors import UserError
from encoder_train.kernels import Dropout, LinearCrossEntropy
from encoder_train.layouts import Layout, Packed, Padded, make_layout


@dataclass(frozen=True)
class ModelDims:
    """Everything the model's construction needs; built from the config and the tokenizer."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    pad_id: int
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    pre_layer_norm: bool = False
    # The modern family's options (config.py documents each; the defaults are RoBERTa's)
    first_attention_norm: bool = True
    position_embedding: str = "learned"  # or "rotary"
    rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    global_attention_every: int = 1
    local_attention: int = 128
    feed_forward: str = "gelu"  # or "geglu"
    attention_bias: bool = True
    feed_forward_bias: bool = True
    norm_bias: bool = True
    head_bias: bool = True
    token_type_embedding: bool = True
    init: str = "bert"  # or "modernbert"
    # BERT's options (the defaults are RoBERTa's)
    position_start: str = "after_pad"  # or "zero": where learned positions start counting
    type_vocab_size: int = 1  # token-type rows; every input uses type 0, the others are kept for export

    @property
    def rotary(self) -> bool:
        return self.position_embedding == "rotary"

    # ---- the shape rule: how many tokens a row may hold for the positions, in one place ----

    @property
    def first_position(self) -> int:
        """The position of a row's first token: RoBERTa's learned positions start past the pad id (pads sit at
        pad_id), BERT's learned positions and rotary ones at 0."""
        return self.pad_id + 1 if not self.rotary and self.position_start == "after_pad" else 0

    @property
    def max_tokens(self) -> int:
        """Longest row the positions hold."""
        return self.max_position_embeddings - self.first_position

    def positions_for(self, tokens: int) -> int:
        """model.max_position_embeddings a row of `tokens` tokens needs."""
        return tokens + self.first_position

    def check_row_length(self, tokens: int, where: str, fix: str) -> None:
        """Refuse rows of `tokens` tokens that the positions cannot hold, in one sentence for every family:
        `where` names what asked for them, `fix` is what to do besides raising max_position_embeddings."""
        if tokens <= self.max_tokens:
            return
        counted = ("rotary positions count from 0" if self.rotary else "learned positions count from 0"
                   if not self.first_position else f"learned positions start past the pad id, {self.pad_id} + 1")
        raise UserError(
            f"{where}: rows of {tokens} tokens do not fit model.max_position_embeddings "
            f"{self.max_position_embeddings}, which holds rows of at most {max(self.max_tokens, 0)} tokens "
            f"({counted}); raise it to {self.positions_for(tokens)}{fix}."
        )

    def is_global(self, layer: int) -> bool:
        """Layers 0, N, 2N, ... attend over the whole row; the others within the local window."""
        return layer % self.global_attention_every == 0


class Embeddings(nn.Module):
    """Token embeddings, plus learned positions and a token type where the model has them, then a LayerNorm.
    Rotary models add no positions here: attention rotates q and k instead."""

    def __init__(self, d: ModelDims):
        super().__init__()
        self.pad_id = d.pad_id
        self.after_pad = d.first_position > 0  # RoBERTa's positions; BERT's count from 0
        self.word_embeddings = nn.Embedding(d.vocab_size, d.hidden_size, padding_idx=d.pad_id)
        # RoBERTa's pad row of the positions is the pads' position, kept at zero; BERT's has no pad row.
        self.position_embeddings = (None if d.rotary else nn.Embedding(
            d.max_position_embeddings, d.hidden_size, padding_idx=d.pad_id if self.after_pad else None))
        # Type 0 added everywhere (RoBERTa has one type; BERT's type 1 marks a second segment, which masked-LM
        # pretraining without the next-sentence task never has): (type_vocab_size, H)
        self.token_type_embeddings = (nn.Embedding(d.type_vocab_size, d.hidden_size) if d.token_type_embedding
                                      else None)
        self.norm = nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps, bias=d.norm_bias)
        self.dropout = Dropout(d.dropout)

    def forward(self, input_ids: torch.Tensor, layout: Layout) -> torch.Tensor:
        if isinstance(layout, Packed):  # embed the real tokens only: (N_tokens,)
            x = self.word_embeddings(layout.pack(input_ids))
        else:
            x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if not self.after_pad:  # BERT's: each token's place in its row, (T,) padded or (N_tokens,) packed
                positions = layout.positions()
            # RoBERTa's positions: real tokens count up from pad_id + 1, pads stay at pad_id.
            elif isinstance(layout, Packed):  # (N_tokens,): each token's place in its row, offset
                positions = layout.positions() + (self.pad_id + 1)
            else:
                keep = layout.mask.long()  # (B, T)
                positions = torch.cumsum(keep, dim=1) * keep + self.pad_id
            x = x + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.norm(x))  # (B, T, H) or (N_tokens, H)


class Rotary(nn.Module):
    """Rotary position embeddings (RoPE): pairs of dimensions (i, i + hs/2) of q and k rotated by angles
    position x theta^(-2i/hs); positions count from 0 within each row. No parameters."""

    def __init__(self, head_size: int, theta: float):
        super().__init__()
        self.head_size = head_size
        self.register_buffer("inv_freq", torch.empty(head_size // 2), persistent=False)
        self.set_theta(theta)

    def set_theta(self, theta: float) -> None:
        """Change the base (a context-extension phase raises it); the buffer stays where the model is."""
        self.theta = theta
        hs = self.head_size
        inv_freq = 1.0 / (theta ** (torch.arange(0, hs, 2, dtype=torch.float32, device=self.inv_freq.device) / hs))
        self.inv_freq.copy_(inv_freq)  # (hs/2,)

    def forward(self, q: torch.Tensor, k: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (..., nh, hs) -> q, k rotated, in their dtype (in fp32 inside). The angles of each token's place
        in its row are computed once per batch and base, and shared by the layers that use that base."""
        key = ("rotary", self.theta)
        if key not in layout.cache:
            angles = layout.positions()[..., None].float() * self.inv_freq  # (..., hs/2)
            angles = torch.cat([angles, angles], dim=-1)[..., None, :]  # (..., 1, hs): an angle per dim, all heads
            layout.cache[key] = (angles.cos(), angles.sin())
        cos, sin = layout.cache[key]

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.float().chunk(2, dim=-1)
            return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

        return rotate(q), rotate(k)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the whole row (a global layer) or a window of it (a local layer)."""

    def __init__(self, d: ModelDims, layer: int = 0):
        super().__init__()
        self.num_heads = d.num_heads
        self.head_size = d.hidden_size // d.num_heads
        # Separate q/k/v parameters keep the export a pure renaming; forward fuses them into one matmul.
        self.query = nn.Linear(d.hidden_size, d.hidden_size, bias=d.attention_bias)
        self.key = nn.Linear(d.hidden_size, d.hidden_size, bias=d.attention_bias)
        self.value = nn.Linear(d.hidden_size, d.hidden_size, bias=d.attention_bias)
        self.output = nn.Linear(d.hidden_size, d.hidden_size, bias=d.attention_bias)
        self.attention_dropout = d.attention_dropout
        self.dropout = Dropout(d.dropout)
        self.window = None if d.is_global(layer) else d.local_attention  # None: the whole row
        theta = d.rope_theta if self.window is None else d.local_rope_theta
        self.rotary = Rotary(self.head_size, theta) if d.rotary else None

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """(B, T, H) padded or (N_tokens, H) packed -> the same shape; "..." below is (B, T) or (N_tokens,)."""
        p = self.attention_dropout if self.training else 0.0
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3H, H)
        bias = None if self.query.bias is None else torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(x, weight, bias).unflatten(-1, (3, self.num_heads, self.head_size))  # (..., 3, nh, hs)
        q, k, v = qkv.unbind(-3)  # each (..., nh, hs), a view
        if self.rotary is not None:
            q, k = self.rotary(q, k, layout)  # by each token's place in its row
        y = layout.attend(q, k, v, p, self.window)  # (..., nh, hs): the layout hides the padding from attention
        return self.dropout(self.output(y.flatten(-2)))  # (..., H)


class FeedForward(nn.Module):
    """gelu: down(GELU(up(x))). geglu: up projects to 2 x intermediate; GELU of the first half gates the second
    (ModernBERT), and dropout sits before `down`, where ModernBERT has it."""

    def __init__(self, d: ModelDims):
        super().__init__()
        self.gated = d.feed_forward == "geglu"
        width = d.intermediate_size * (2 if self.gated else 1)
        self.up = nn.Linear(d.hidden_size, width, bias=d.feed_forward_bias)
        self.down = nn.Linear(d.intermediate_size, d.hidden_size, bias=d.feed_forward_bias)
        self.dropout = Dropout(d.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            value, gate = self.up(x).chunk(2, dim=-1)  # (..., H) -> 2 x (..., I)
            return self.down(self.dropout(F.gelu(value) * gate))  # -> (..., H)
        return self.dropout(self.down(F.gelu(self.up(x))))  # (..., H) -> (..., 4H) -> (..., H)


class EncoderLayer(nn.Module):
    def __init__(self, d: ModelDims, layer: int = 0):
        super().__init__()
        self.pre_layer_norm = d.pre_layer_norm
        self.attention = SelfAttention(d, layer)
        # Pre-LN's first layer reads the embeddings' output, already normalised: ModernBERT skips its norm.
        skip = d.pre_layer_norm and layer == 0 and not d.first_attention_norm
        self.attention_norm = nn.Identity() if skip else nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps,
                                                                        bias=d.norm_bias)
        self.feed_forward = FeedForward(d)
        self.feed_forward_norm = nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps, bias=d.norm_bias)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """(B, T, H) or (N_tokens, H) -> the same shape."""
        if self.pre_layer_norm:
            x = x + self.attention(self.attention_norm(x), layout)
            return x + self.feed_forward(self.feed_forward_norm(x))
        x = self.attention_norm(x + self.attention(x, layout))
        return self.feed_forward_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d, i) for i in range(d.num_layers))
        # Pre-LN leaves the residual stream un-normalised; one LayerNorm closes it.
        self.final_norm = (nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps, bias=d.norm_bias)
                           if d.pre_layer_norm else None)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, layout)
        return x if self.final_norm is None else self.final_norm(x)


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder. The decoder's weight is the word-embedding matrix."""

    def __init__(self, d: ModelDims, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(d.hidden_size, d.hidden_size, bias=d.head_bias)
        self.norm = nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps, bias=d.norm_bias)
        self.word_embeddings = [word_embeddings]  # a list: tied, not registered a second time
        self.bias = nn.Parameter(torch.zeros(d.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(x)))
        return F.linear(x, self.word_embeddings[0].weight, self.bias)  # (..., H) -> (..., V)

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N, H) hidden states at the predicted positions, (N,) targets -> summed cross-entropy."""
        x = self.norm(F.gelu(self.dense(x)))
        return LinearCrossEntropy.apply(x, self.word_embeddings[0].weight, self.bias, target)


@dataclass
class MLMOutput:
    loss: torch.Tensor | None  # scalar: mean (or sum, see `reduction`) over predicted positions
    logits: torch.Tensor | None  # (B, T, V) when asked for, else None
    predicted_logits: torch.Tensor | None = None  # (N, V) at the predicted positions, when asked for


class MaskedLM(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.dims = d
        self.embeddings = Embeddings(d)
        self.encoder = Encoder(d)
        self.head = MLMHead(d, self.embeddings.word_embeddings)
        if d.init == "modernbert":
            self._init_modernbert()
        else:
            self.apply(self._init_bert)

    @staticmethod
    def _init_bert(module: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights, zero biases, identity LayerNorms, zero pad rows.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _init_modernbert(self) -> None:
        """ModernBERT's (transformers' ModernBertPreTrainedModel._init_weights): normal truncated at 2 sigma;
        embeddings and input projections sigma 0.02, output projections and the head's dense layer
        0.02 / sqrt(2 x layers); zero biases (the decoder's too), identity LayerNorms; pad row not zeroed."""
        small = 0.02 / math.sqrt(2.0 * self.dims.num_layers)

        def normal(weight: torch.Tensor, std: float) -> None:
            nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)

        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                out = name.endswith(("attention.output", "feed_forward.down", "head.dense"))
                normal(module.weight, small if out else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                normal(module.weight, 0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_rope_theta(self, global_theta: float, local_theta: float) -> None:
        """The rotary bases of the global and local layers (no parameter changes: a phase may set them)."""
        for layer in self.encoder.layers:
            rotary = layer.attention.rotary
            if rotary is not None:
                rotary.set_theta(global_theta if layer.attention.window is None else local_theta)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for p in self.embeddings.parameters())
        return n

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        predict_positions: torch.Tensor | None = None,
        reduction: str = "mean",
        return_logits: bool = False,
        packing: tuple | None = None,
        return_predicted_logits: bool = False,
    ) -> MLMOutput:
        """input_ids, attention_mask (True = real token), labels: (B, T); labels are -100 where unpredicted.

        The head runs on the predicted positions only (sparse prediction: about 15% of tokens), which
        saves most of the vocabulary projection. `predict_positions` (N,) are those positions as flat
        indices into B*T, computed by the data workers so the device never waits on a `nonzero`.
        `packing` = (token_index, cu_seqlens, max_seqlen[, positions]) runs the unpadded path (see `Packed`), or, when
        it says every row is full, the padded one with no mask; without it the rows are computed padded
        with a mask built from attention_mask. All give the same result (see `make_layout`).
        """
        if attention_mask is None:
            attention_mask = input_ids != self.dims.pad_id
        layout = make_layout(attention_mask, packing)
        h = self.encode(input_ids, layout)  # (B, T, H) or (N_tokens, H)
        logits = predicted = None
        if return_logits:
            logits = self.head(layout.unpack(h) if isinstance(layout, Packed) else h)
        loss = None
        if labels is not None:
            flat_labels = labels.reshape(-1)
            if predict_positions is None:
                predict_positions = torch.nonzero(flat_labels != IGNORE_INDEX).squeeze(1)  # host waits here
            target = flat_labels.index_select(0, predict_positions)  # (N,)
            if return_predicted_logits:
                predicted = self.predict(h, predict_positions, layout)  # (N, V)
                loss = F.cross_entropy(predicted.float(), target, reduction="sum")
            else:
                loss = self.head.loss(self.select(h, predict_positions, layout), target)
            if reduction == "mean":
                loss = loss / max(1, len(target))
        return MLMOutput(loss=loss, logits=logits, predicted_logits=predicted if return_predicted_logits else None)

    def encode(self, input_ids: torch.Tensor, layout: Layout | torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> final hidden states: (B, T, H) padded, or (N_tokens, H) packed.
        A bare (B, T) attention mask means the padded layout."""
        if isinstance(layout, torch.Tensor):
            layout = Padded(layout)
        return self.encoder(self.embeddings(input_ids, layout), layout)

    def predict(self, hidden: torch.Tensor, positions: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        """Vocabulary logits at flat (B*T) positions only -> (N, V)."""
        return self.head(self.select(hidden, positions, layout))

    @staticmethod
    def select(hidden: torch.Tensor, positions: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        """Hidden states (B, T, H) or packed (N_tokens, H) at flat (B*T) positions -> (N, H)."""
        if isinstance(layout, Packed):
            # flat (B*T) position -> its row in the packed (N_tokens, H) activations
            packed_row = torch.cumsum(layout.mask.reshape(-1).long(), 0) - 1
            positions = packed_row.index_select(0, positions)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)


def compile_layers(model: MaskedLM, backend: str | Callable = "inductor") -> None:
    """torch.compile each encoder layer in place (parameter names, and so checkpoints, are unchanged).
    dynamic=True: the token count and row length change every batch; one graph covers them all."""
    for layer in model.encoder.layers:
        layer.compile(dynamic=True, backend=backend)


def compile_model(model: MaskedLM, backend: str | Callable = "inductor") -> None:
    """torch.compile the whole model in place with static shapes: for token-budget batches (data.batch_tokens),
    whose shapes never change, one graph serves the run, and on a GPU the step stops waiting on launches."""
    model.compile(dynamic=False, backend=backend)
