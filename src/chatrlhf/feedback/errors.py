"""What the feedback store and app refuse, as domain errors. The web app turns each into an HTTP answer in one
exception handler (feedback/app.py: ``status`` is the status it answers with); the CLI prints them as one line."""

from __future__ import annotations

from chatrlhf.errors import UsageError


class FeedbackError(UsageError):
    """A request the store or the app refuses: bad input (400) unless a subclass says otherwise."""

    status = 400


class Invalid(FeedbackError):
    """Malformed or out-of-range input."""


class NotLoggedIn(FeedbackError):
    """No valid session (logged out, switched off, or a session from before)."""
    status = 401


class PermissionDenied(FeedbackError):
    """The user's role may not do this, or the request is not from this origin."""
    status = 403


class NotFound(FeedbackError):
    """No such object, or one the user may not see (the same answer, so ids reveal nothing)."""
    status = 404


class Conflict(FeedbackError):
    """The request clashes with what is stored (a name taken, an item already answered)."""
    status = 409


class UnsupportedMediaType(FeedbackError):
    """A JSON write not sent as JSON."""
    status = 415


class TooManyAttempts(FeedbackError):
    """Log-in limiter: too many failures."""
    status = 429
