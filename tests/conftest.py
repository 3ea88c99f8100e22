"""Session-wide set-up: the tests' own modules hold models and datasets that recorded runs
reference, so the test session trusts them (see the trust boundary in
``attribution.record.references``)."""

from attribution.record.references import trust

trust("tests")
