"""The HTTP API: wire types, routes, the outer guard and the app; nothing below it knows HTTP."""
