"""Emulated multi-DC testbed: namespaces + shaped links (netns), rate probe, namespace launcher."""
