//! What only PostgreSQL needs: writes of many rows in one round trip. A statement per row is a
//! network round trip per row; a bulk import uses COPY, and a batch of state changes writes
//! its rows with one statement over arrays.

use std::collections::HashMap;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::error::Result;
use crate::jobs::CopyJob;
use crate::sql::PgConn;
use crate::state::State;

/// Inserts checked jobs with COPY: their rows, their CREATED events and their edges. Parents
/// earlier in `jobs` are found by id. Returns the new row numbers, in order.
pub(crate) fn copy_jobs(pg: &mut PgConn, jobs: &[CopyJob], now: i64) -> Result<Vec<i64>> {
    let n = jobs.len() as i64;
    // Row numbers are taken from the identity's sequence first, so that edges to jobs of this
    // chunk can be written in the same pass.
    let pks: Vec<i64> = pg
        .client
        .query(
            "SELECT nextval(pg_get_serial_sequence('jobs', 'pk')) FROM generate_series(1, $1::bigint)",
            &[&n],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let local: HashMap<Uuid, i64> = jobs.iter().zip(&pks).map(|(j, pk)| (*j.id, *pk)).collect();

    let sink = pg.client.copy_in(
        "COPY jobs (pk, job_id, workflow, name, description, input_files, stage_in_url, \
         stage_out_files, stage_out_url, wall_time_minutes, num_nodes, coschedule_num_nodes, \
         ranks_per_node, cpu_affinity, threads_per_rank, threads_per_core, node_packing_count, \
         environ_vars, mpi_flags, application, args, user_workdir, wait_for_parents, \
         post_error_handler, post_timeout_handler, auto_timeout_retry, max_restarts, data, state) \
         FROM STDIN BINARY",
    )?;
    let (i, t, b) = (Type::INT8, Type::TEXT, Type::BYTEA);
    let types = [
        i.clone(),
        b,
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        i.clone(),
        i.clone(),
        i.clone(),
        i.clone(),
        t.clone(),
        i.clone(),
        i.clone(),
        i.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        i.clone(),
        i.clone(),
        i.clone(),
        i.clone(),
        i.clone(),
        t,
        i,
    ];
    let mut w = BinaryCopyInWriter::new(sink, &types);
    let created = State::Created.code();
    for (j, pk) in jobs.iter().zip(&pks) {
        let s = j.spec;
        let key = crate::model::job_key(j.id);
        let id: &[u8] = &key;
        let ints = [
            i64::from(s.wall_time_minutes),
            i64::from(s.num_nodes),
            i64::from(s.coschedule_num_nodes),
            i64::from(s.ranks_per_node),
            i64::from(s.threads_per_rank),
            i64::from(s.threads_per_core),
            i64::from(s.node_packing_count),
            s.wait_for_parents as i64,
            s.post_error_handler as i64,
            s.post_timeout_handler as i64,
            s.auto_timeout_retry as i64,
            i64::from(s.max_restarts),
        ];
        let data = s.data.to_string();
        let row: [&(dyn ToSql + Sync); 29] = [
            pk,
            &id,
            &s.workflow,
            &s.name,
            &s.description,
            &s.input_files,
            &s.stage_in_url,
            &s.stage_out_files,
            &s.stage_out_url,
            &ints[0],
            &ints[1],
            &ints[2],
            &ints[3],
            &s.cpu_affinity,
            &ints[4],
            &ints[5],
            &ints[6],
            &s.environ_vars,
            &s.mpi_flags,
            &s.application,
            &s.args,
            &s.user_workdir,
            &ints[7],
            &ints[8],
            &ints[9],
            &ints[10],
            &ints[11],
            &data,
            &created,
        ];
        w.write(&row)?;
    }
    w.finish()?;

    let sink = pg
        .client
        .copy_in("COPY events (job, time_us, from_state, to_state, message) FROM STDIN BINARY")?;
    let mut w = BinaryCopyInWriter::new(
        sink,
        &[Type::INT8, Type::INT8, Type::INT8, Type::INT8, Type::TEXT],
    );
    let none: Option<i64> = None;
    for pk in &pks {
        w.write(&[pk, &now, &none, &created, &""])?;
    }
    w.finish()?;

    let edges: Vec<(i64, i64)> = jobs
        .iter()
        .zip(&pks)
        .flat_map(|(j, pk)| {
            j.parents.iter().map(|p| {
                let parent = match p {
                    Ok(ppk) => *ppk,
                    Err(id) => local[id],
                };
                (parent, *pk)
            })
        })
        .collect();
    if !edges.is_empty() {
        let sink = pg
            .client
            .copy_in("COPY deps (parent, child) FROM STDIN BINARY")?;
        let mut w = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::INT8]);
        let mut seen = std::collections::HashSet::new();
        for (p, c) in &edges {
            if seen.insert((p, c)) {
                w.write(&[p, c])?;
            }
        }
        w.finish()?;
    }
    Ok(pks)
}

/// One job's row after a batch of state changes.
pub(crate) struct JobUpdate {
    pub pk: i64,
    pub state: i64,
    pub return_code: Option<i64>,
    pub num_restarts: i64,
    pub lease_session: Option<i64>,
}

/// Writes the rows of a batch of state changes with one statement. The join alone leaves the
/// planner a hash join over the whole table (a sequential scan per batch, of every job of the
/// campaign); `pk = ANY` lets it fetch the batch's rows by primary key.
pub(crate) fn update_jobs(pg: &mut PgConn, rows: &[JobUpdate]) -> Result<()> {
    let pks: Vec<i64> = rows.iter().map(|r| r.pk).collect();
    let states: Vec<i64> = rows.iter().map(|r| r.state).collect();
    let codes: Vec<Option<i64>> = rows.iter().map(|r| r.return_code).collect();
    let restarts: Vec<i64> = rows.iter().map(|r| r.num_restarts).collect();
    let leases: Vec<Option<i64>> = rows.iter().map(|r| r.lease_session).collect();
    pg.client.execute(
        "UPDATE jobs SET state = u.state, return_code = u.return_code, \
         num_restarts = u.num_restarts, lease_session = u.lease_session \
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[]) \
         AS u(pk, state, return_code, num_restarts, lease_session) \
         WHERE jobs.pk = u.pk AND jobs.pk = ANY($1)",
        &[&pks, &states, &codes, &restarts, &leases],
    )?;
    Ok(())
}

/// A history line to write.
pub(crate) struct NewEvent {
    pub job: i64,
    pub time_us: i64,
    pub from_state: Option<i64>,
    pub to_state: i64,
    pub message: String,
}

/// Writes history lines with one statement, in order.
pub(crate) fn insert_events(pg: &mut PgConn, events: &[NewEvent]) -> Result<()> {
    let jobs: Vec<i64> = events.iter().map(|e| e.job).collect();
    let times: Vec<i64> = events.iter().map(|e| e.time_us).collect();
    let froms: Vec<Option<i64>> = events.iter().map(|e| e.from_state).collect();
    let tos: Vec<i64> = events.iter().map(|e| e.to_state).collect();
    let msgs: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
    pg.client.execute(
        "INSERT INTO events (job, time_us, from_state, to_state, message) \
         SELECT job, time_us, from_state, to_state, message \
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[]) \
         WITH ORDINALITY AS e(job, time_us, from_state, to_state, message, n) ORDER BY n",
        &[&jobs, &times, &froms, &tos, &msgs],
    )?;
    Ok(())
}
