"""A TransformerLens block that normalises the attention input once, not three times.

TransformerLens's ``TransformerBlock`` calls ``ln1`` separately on the query, key and value inputs,
which are the same tensor unless ``use_split_qkv_input`` / ``use_attn_in`` is on. While ``ln1``'s hooks
are unused, ``FastTransformerBlock`` computes it once and passes the result three times; every other
hook fires in TransformerLens's order. Other configurations, or a hook on ``ln1`` (which
TransformerLens fires three times per block), use TransformerLens's own forward.
"""

from __future__ import annotations

from transformer_lens.components import TransformerBlock
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from vlm_lens._tl.fast.attention import has_any_hook


class FastTransformerBlock(TransformerBlock):
    """``TransformerBlock`` with one ``ln1`` call per forward on the common pre-norm path."""

    def _simple_path(self, shortformer_pos_embed) -> bool:
        cfg = self.cfg
        ln1_hooks = [p for name, p in self.ln1.named_children() if name.startswith("hook_")]
        return not (
            shortformer_pos_embed is not None or cfg.use_attn_in or cfg.use_split_qkv_input
            or cfg.attn_only or cfg.parallel_attn_mlp or cfg.use_normalization_before_and_after
            or cfg.original_architecture in POST_NORM_ARCHITECTURES
            or any(has_any_hook(p) for p in ln1_hooks)
        )

    def forward(self, resid_pre, shortformer_pos_embed=None, past_kv_cache_entry=None, attention_mask=None):
        if not self._simple_path(shortformer_pos_embed):
            return super().forward(resid_pre, shortformer_pos_embed, past_kv_cache_entry, attention_mask)
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_in = self.ln1(resid_pre)
        attn_out = self.attn(query_input=attn_in, key_input=attn_in, value_input=attn_in,
                             past_kv_cache_entry=past_kv_cache_entry, attention_mask=attention_mask)
        attn_out = self.hook_attn_out(attn_out)
        if resid_pre.device != attn_out.device:
            resid_pre = resid_pre.to(attn_out.device)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.cfg.use_hook_mlp_in else resid_mid
        mlp_out = self.apply_mlp(self.ln2(mlp_in))
        return self.hook_resid_post(resid_mid + mlp_out)
