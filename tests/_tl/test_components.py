"""``with_attention_overlay``: the causal mask OR the family's pairs, then the local window."""

import pytest
import torch
from transformer_lens.components import GroupedQueryAttention
from transformer_lens.config import HookedTransformerConfig

from vlm_lens._tl.components import with_attention_overlay
from vlm_lens._tl.fast import install_fast_components


def _attention(attn_type: str) -> GroupedQueryAttention:
    cfg = HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_heads=2, n_key_value_heads=1, n_ctx=16, d_vocab=4,
                                  act_fn="gelu", positional_embedding_type="rotary", rotary_dim=4, window_size=3,
                                  use_local_attn=True, attn_types=[attn_type])
    return GroupedQueryAttention(cfg, attn_type, 0)


@pytest.mark.parametrize("attn_type", ["global", "local"])
def test_overlay_widens_the_causal_mask_inside_the_window(attn_type):
    attn = _attention(attn_type)
    plain = attn._make_causal_mask(5, 5, 0, torch.device("cpu"))
    pairs = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    pairs[..., 0, 4] = pairs[..., 4, 0] = pairs[..., 1, 2] = True
    with_attention_overlay(attn, lambda n_q, n_k, offset, device: pairs[..., offset:offset + n_q, :n_k])
    mask = attn._make_causal_mask(5, 5, 0, torch.device("cpu"))
    expected = plain | pairs
    if attn_type == "local":  # a key more than window_size - 1 back stays masked, overlay or not (later keys pass)
        expected[..., 4, 0] = False
    assert torch.equal(mask, expected)
    assert torch.equal(attn._make_causal_mask(2, 5, 3, torch.device("cpu")), expected[..., 3:, :])  # cached keys


def test_no_overlay_is_transformer_lens_own_mask():
    attn, reference = _attention("local"), _attention("local")
    with_attention_overlay(attn, lambda *args: None)
    device = torch.device("cpu")
    assert torch.equal(attn._make_causal_mask(4, 6, 2, device), reference._make_causal_mask(4, 6, 2, device))


def test_overlay_layers_keep_transformer_lens_forward_and_fast_layers_are_refused():
    attn = _attention("global")
    with_attention_overlay(attn, lambda *args: None)
    holder = torch.nn.ModuleList([attn, _attention("global")])
    install_fast_components(holder)
    assert type(holder[0]).__name__ == "GroupedQueryAttentionWithOverlay"
    with pytest.raises(TypeError, match="before the fast components"):
        with_attention_overlay(holder[1], lambda *args: None)
