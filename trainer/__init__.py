"""The trainer: on-policy prefix distillation of a student against the shared teacher service.

Pure math lives in `losses` (with the loss table), `schedule` and `flops`; `config` (built by `configio`) is the
run's one configuration tree; `sampling`, `teacher_io`, `evaluate` and `checkpoint` do one job each; `setup`
builds a run, `loop` runs its stages in `train(cfg)`, with `distributed`, `progress` and `summary` beside it;
`commands` exposes `prefix-distill train` and `plot`.
"""
