"""Sequence packing for the trainer's forward: a micro-batch's sequences in as few rows as they fit.

RL batches are ragged: a row of a [B, T] batch holds one prompt + response and padding up to the longest
one, and every padded token still goes through every GEMM. Packing places the sequences, longest first,
each into the first row with room (first-fit decreasing, rows of the batch's length T), gives every
token its position within its own sequence and its sequence's segment id, and the decoder lets a token
attend only to its own segment. The logprob of a token is then the same function of the same sequence;
only GEMM row counts (and so rounding) change.

    packed = pack(input_ids, attention_mask)       right-padded [B, T] -> [R, T], R <= B
    packed.rows(t)                                 any [B, T, ...] tensor (MoE routing) laid out the same way
    packed.unpack(x)                               [R, T-1] next-token values -> [B, T-1], zero where unscored
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor
    "[R, T] the sequences, back to back"
    valid: torch.Tensor
    "[R, T] bool: a token, not padding"
    positions: torch.Tensor
    "[R, T] each token's position in its own sequence"
    segments: torch.Tensor
    "[R, T] which sequence (its row in the batch) a token belongs to; -1 for padding"
    src: tuple[torch.Tensor, torch.Tensor]
    "(row, column) in the batch of every packed token"
    dst: tuple[torch.Tensor, torch.Tensor]
    "(row, column) in the packed rows of the same tokens"
    shape: tuple[int, int]
    "the batch's [B, T]"

    def rows(self, t: torch.Tensor, fill) -> torch.Tensor:
        """A per-token tensor of the batch, [B, T, ...], laid out like the packed rows (``fill`` elsewhere)."""
        out = torch.full((self.input_ids.shape[0], self.shape[1], *t.shape[2:]), fill, dtype=t.dtype, device=t.device)
        out[self.dst] = t[self.src]
        return out

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token values of the packed rows, [R, T-1], back in the batch's layout [B, T-1] (differentiable);
        a sequence's last token predicts nothing and stays 0, as padding does."""
        b, t = self.shape
        keep = self.src[1] < t - 1  # the batch column j predicts j + 1: its last column scores nothing
        src_r, src_c, dst_r, dst_c = self.src[0][keep], self.src[1][keep], self.dst[0][keep], self.dst[1][keep]
        out = x.new_zeros(b, t - 1)
        out[src_r, src_c] = x[dst_r, dst_c]
        return out


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packed:
    """First-fit-decreasing packing of right-padded sequences [B, T] (``ValueError`` for other padding)."""
    b, t = input_ids.shape
    valid = attention_mask.bool()
    lengths = valid.sum(1)
    if not torch.equal(valid, torch.arange(t, device=valid.device)[None] < lengths[:, None]):
        raise ValueError("sequence packing needs right-padded rows (each row's tokens first, then padding)")
    fill: list[int] = []  # tokens used in each packed row
    place = [(0, 0)] * b  # (packed row, offset) of each sequence
    for i in sorted(range(b), key=lambda i: -int(lengths[i])):
        n = int(lengths[i])
        row = next((r for r, used in enumerate(fill) if used + n <= t), None)
        if row is None:
            row = len(fill)
            fill.append(0)
        place[i] = (row, fill[row])
        fill[row] += n
    r = max(len(fill), 1)
    dev = input_ids.device
    src_r = torch.cat([torch.full((int(lengths[i]),), i, dtype=torch.long) for i in range(b)]).to(dev)
    src_c = torch.cat([torch.arange(int(lengths[i])) for i in range(b)]).to(dev)
    dst_r = torch.cat([torch.full((int(lengths[i]),), place[i][0], dtype=torch.long) for i in range(b)]).to(dev)
    dst_c = torch.cat([place[i][1] + torch.arange(int(lengths[i])) for i in range(b)]).to(dev)
    ids = torch.zeros(r, t, dtype=input_ids.dtype, device=dev)
    ids[dst_r, dst_c] = input_ids[src_r, src_c]
    packed_valid = torch.zeros(r, t, dtype=torch.bool, device=dev)
    packed_valid[dst_r, dst_c] = True
    positions = torch.zeros(r, t, dtype=torch.long, device=dev)
    positions[dst_r, dst_c] = src_c
    segments = torch.full((r, t), -1, dtype=torch.long, device=dev)
    segments[dst_r, dst_c] = src_r
    return Packed(ids, packed_valid, positions, segments, (src_r, src_c), (dst_r, dst_c), (b, t))
