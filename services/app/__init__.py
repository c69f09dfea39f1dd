"""The composition root: the `prefix-distill` console script, the demo and the config reference.

This is the only package that imports both the trainer and the teacher service; the arrows point one way:
app -> trainer -> teacher client (services.teacher.client) -> wire types, and app -> teacher service.
"""
