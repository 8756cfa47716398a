"""Post-hoc head rearrangement on trained FL runs: APH and LoRAPH (Chen et al., AAAI 2024).

prior.py (noise rule, learning-rate sampling), members.py (stacked member heads and their
batched training), rearrange.py (one client), ood.py (the out-of-distribution pool and each
client's sample of it), run.py (all clients of an FL run, tracked).
"""

METHOD_LABELS = {"aph": "APH", "loraph": "LoRAPH"}  # names in tables and figures; "w/o" is the unmodified model
