"""The Lightning-free engine: schedules, parameter selection, masks and statistics.

Everything here works on plain ``torch.nn.Module`` objects; the callbacks in ``lightning_compress.callbacks``
only adapt it to the Trainer's hooks.
"""
