package dev.kro.peer;

import jakarta.annotation.PreDestroy;
import java.time.Instant;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import org.springframework.stereotype.Component;

/**
 * The handler's observations as lines on stdout, the format bench/peers.py parses for both
 * sides: {@code EV <F|H> <event id> <stage> <epoch microseconds>}: F the call failed (threw), H
 * it was handled; stage 0 is the main topic, 1 the retry topic.
 *
 * <p>Lines gather in memory and go out every 100 ms in one write, so a listener thread never
 * blocks on the pipe (as ours does not) and Spring's own log lines, also on stdout, never cut
 * one in half (both write under System.out's lock).
 */
@Component
public class EventLog {
    private final ScheduledExecutorService flusher =
            Executors.newSingleThreadScheduledExecutor(r -> {
                Thread t = new Thread(r, "event-log");
                t.setDaemon(true);
                return t;
            });
    private StringBuilder pending = new StringBuilder();

    public EventLog() {
        flusher.scheduleWithFixedDelay(this::flush, 100, 100, TimeUnit.MILLISECONDS);
    }

    public void event(char kind, long id, int stage) {
        Instant now = Instant.now();
        long micros = now.getEpochSecond() * 1_000_000L + now.getNano() / 1_000;
        String line = "EV " + kind + " " + id + " " + stage + " " + micros + "\n";
        synchronized (this) {
            pending.append(line);
        }
    }

    public void line(String text) {
        synchronized (this) {
            pending.append(text).append('\n');
        }
        flush();
    }

    @PreDestroy
    public void flush() {
        StringBuilder out;
        synchronized (this) {
            if (pending.length() == 0) {
                return;
            }
            out = pending;
            pending = new StringBuilder();
        }
        System.out.print(out);
        System.out.flush();
    }
}
