"""The feedback app's routes, one APIRouter per area (auth, annotate, replies, admin), and what they share
(deps.py: the current user and role, CSRF, forms, JSON bodies; bodies.py: the pydantic request bodies)."""
