"""Conversations on top of the runtime: the terminal chat, tool calls and their grammars."""
