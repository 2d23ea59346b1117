//! Least privilege: what walcast's own role needs, as the statements a DBA runs, and the
//! checks that name a missing one.
//!
//! On the source, walcast needs the `REPLICATION` attribute (the slot and the stream),
//! `SELECT` on the two tables (the content cache, the backfill's snapshot, `verify`), and
//! a publication that the tables' owner created beforehand (creating or altering one needs
//! ownership of the tables, which walcast's role should not have). On the analytics
//! database it needs to own schema `analytics` (walcast creates its tables there and
//! migrates them).

/// The statements that give `role` exactly what walcast needs: on the source database
/// `database` (run by the tables' owner or a superuser), then on the analytics database.
/// `tables` is the publication's table list as walcast would create it
/// (`setup::published_tables`: with a partition's row filter when there is one).
pub fn grants_sql(role: &str, database: &str, publication: &str, tables: &str) -> String {
    let role = quote_ident(role);
    let database = quote_ident(database);
    format!(
        "-- walcast's role, with what it needs and nothing more.\n\
         -- On the source database {database}, as a superuser or the owner of the tables:\n\
         CREATE ROLE {role} LOGIN REPLICATION; -- then set its password: \\password {role}\n\
         GRANT CONNECT ON DATABASE {database} TO {role};\n\
         GRANT USAGE ON SCHEMA public TO {role};\n\
         GRANT SELECT ON public.content, public.engagement_events TO {role};\n\
         ALTER TABLE public.content REPLICA IDENTITY DEFAULT;\n\
         ALTER TABLE public.engagement_events REPLICA IDENTITY DEFAULT;\n\
         CREATE PUBLICATION {publication} FOR TABLE {tables}\n    \
             WITH (publish_via_partition_root = true);\n\
         \n\
         -- On the analytics database (WALCAST_ANALYTICS_URL; by default the same one):\n\
         CREATE SCHEMA IF NOT EXISTS analytics AUTHORIZATION {role};\n\
         -- If the analytics database is another one:\n\
         -- GRANT CONNECT ON DATABASE <analytics database> TO {role};\n"
    )
}

/// An identifier as SQL takes it: as is when it is a plain lower-case name, quoted
/// otherwise.
fn quote_ident(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_only_when_they_must_be() {
        assert_eq!(quote_ident("walcast"), "walcast");
        assert_eq!(quote_ident("Walcast"), "\"Walcast\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("1x"), "\"1x\"");
        let sql = grants_sql(
            "walcast",
            "app",
            "walcast_pub",
            &crate::source::published_tables(crate::config::Partition::WHOLE),
        );
        assert!(
            sql.contains("GRANT SELECT ON public.content, public.engagement_events TO walcast;")
        );
        assert!(sql.contains("CREATE PUBLICATION walcast_pub FOR TABLE"));
        assert!(sql.contains("CREATE SCHEMA IF NOT EXISTS analytics AUTHORIZATION walcast;"));
    }
}
