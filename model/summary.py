"""A recipe's size without allocating it (``python -m dsv3.train.summary model=v3_671b`` prints it):
one ``name: value`` per line. Parameter counts are exact; FLOPs are model FLOPs per trained
token (forward + backward) at ``data.seq_len``, the main model's and what MTP adds.
"""
from dsv3.model.config import ModelConfig
from dsv3.model.counting import count


def summary_lines(cfg: ModelConfig, seq_len: int) -> list[str]:
    counts = count(cfg, seq_len)
    return [
        f"total_params: {counts.total_params}",
        f"activated_params: {counts.activated_params}",
        f"mtp_params: {counts.mtp_params}",
        f"mtp_activated_params: {counts.mtp_activated_params}",
        f"seq_len: {seq_len}",
        f"gflop_per_token: {counts.flop_per_token / 1e9:.6g}",
        f"mtp_gflop_per_token: {counts.mtp_flop_per_token / 1e9:.6g}",
    ]
