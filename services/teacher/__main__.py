"""`python -m services.teacher serve|frontend|worker ...`: the teacher's own commands, without the trainer.

`prefix-distill teacher ...` is the same group; launchers of teacher processes use this entry so the teacher
never imports the composition root (services.app).
"""

from services.teacher.commands import teacher_app

if __name__ == "__main__":
    teacher_app()
