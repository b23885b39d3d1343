"""The application (extra ``[train]``): the ``ce-dynamics`` command and ``train.py``, configs, training, replay of
released checkpoints, sweeps, data and the end-of-run summary."""
