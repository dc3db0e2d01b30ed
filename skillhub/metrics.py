"""Prometheus metrics of one service instance (a private registry, so tests and embedded hubs never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Ingest, localize, stitch and publish durations; skills; versions; HTTP requests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ingest_seconds = Histogram("skillhub_ingest_seconds", "Drop staged to skill registered", buckets=_BUCKETS,
                                        registry=r)
        self.localize_seconds = Histogram("skillhub_localize_seconds", "Localization of one checkpoint",
                                          buckets=_BUCKETS, registry=r)
        self.stitch_seconds = Histogram("skillhub_stitch_seconds", "Reconcile: stitcher updates and snapshot",
                                        buckets=_BUCKETS, registry=r)
        self.publish_seconds = Histogram("skillhub_publish_seconds", "Publishing a version (manifest, pointer)",
                                         buckets=_BUCKETS, registry=r)
        self.skills = Gauge("skillhub_skills_active", "Skills stitched into the served version", registry=r)
        self.versions = Counter("skillhub_versions_published", "Model versions published", registry=r)
        self.rejected = Counter("skillhub_drops_rejected", "Drops moved to .rejected", registry=r)
        self.skill_accuracy = Gauge("skillhub_skill_accuracy", "A skill's accuracy on its check examples, per model "
                                    "(base, skill: its own localized model, merged: the served version)",
                                    ["skill", "route"], registry=r)
        self.requests = Histogram("skillhub_request_seconds", "HTTP request latency", ["route", "status"],
                                  buckets=_BUCKETS, registry=r)

        # A follower (``skillhub run --follow``): the version it serves, the one the primary's ``current`` names,
        # and how long each version took from the primary's publication to being served here.
        self.follow_version = Gauge("skillhub_follow_version", "Version this follower serves", registry=r)
        self.follow_primary_version = Gauge("skillhub_follow_primary_version",
                                            "Version the primary's models/current names", registry=r)
        self.follow_lag = Gauge("skillhub_follow_lag_seconds", "Primary's publication to served here, last version "
                                "(growing while behind)", registry=r)
        self.follow_apply_seconds = Histogram("skillhub_follow_apply_seconds", "Follower: applying one version's "
                                              "manifest (masks replayed, snapshot)", buckets=_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
