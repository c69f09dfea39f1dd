"""The trainer: on-policy prefix distillation of a student against the shared teacher service.

Pure math lives in `losses`, `schedule` and `flops`; `sampling`, `teacher_io`, `evaluate` and `checkpoint` do one
job each; `loop` wires them into `train(cfg)`; `commands` exposes `prefix-distill train` and `plot`.
"""
