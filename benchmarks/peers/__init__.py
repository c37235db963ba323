"""Peers in the same benchmark run (``run.py --peers nnsight,tl-bridge``): vlm_lens, nnsight and
TransformerLens 4's ``TransformerBridge`` on the same checkpoint folder and inputs, each timed against HF
in the same rounds and checked against HF's logits, greedy tokens and two vision edits.

``common`` (what each library is asked, and how it is timed), one module per library
(``vlm_lens_column``, ``nnsight_calls``, ``tl_bridge`` + ``tl_bridge_child``), ``compare`` (the run) and
``report`` (the table). Nothing here imports vlm_lens or a peer at import time.
"""
