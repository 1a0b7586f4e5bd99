"""The wire contract shared by units and the controller: topics, messages, ids, clocks."""

__version__ = "0.1.0"
