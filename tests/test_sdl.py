from api.schema import SDL_PATH, sdl


def test_exported_sdl_is_current():
    assert SDL_PATH.read_text() == sdl(), "api/schema.graphql is stale: run `make schema` (creditpool export-schema)"
