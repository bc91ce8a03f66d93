"""The database: tables, engines, migrations and the job queue; the bottom layer with config."""
