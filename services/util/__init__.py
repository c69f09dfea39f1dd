"""Small helpers shared by the teacher, the model tooling, the app and the tests (no project imports)."""
