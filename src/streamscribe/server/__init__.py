"""The web application: WebSocket route, HTTP routes, auth."""
