"""The training backends behind `raysft/train/loop.py`'s protocol, one module each; what each can do is data in
`raysft/capabilities.py`."""
