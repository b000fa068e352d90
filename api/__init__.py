"""The thin GraphQL skin over `domain`: types, inputs, resolvers, the ASGI app and the CLI."""
