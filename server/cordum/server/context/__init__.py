"""The context engine: model windows (BuildWindow) and conversation memory (UpdateMemory)
under upstream's `mem:<memory_id>:*` keys. See engine.py for the behaviour."""
