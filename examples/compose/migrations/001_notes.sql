-- 001: the notes table. Run by the migrate service (compose.yaml) before the API starts.
-- Idempotent: `docker compose up` runs migrate at every start, against the database it kept in
-- its volume; a second run changes nothing.
BEGIN;
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS notes (
    id bigserial PRIMARY KEY,
    title text NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO schema_migrations (version) VALUES (1) ON CONFLICT (version) DO NOTHING;
COMMIT;
