import pluggy

hookspec = pluggy.HookspecMarker("paperhooks")
