"""The long-running coordinator: enrollment, artifacts, SuperLink, node trust."""
