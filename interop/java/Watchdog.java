/**
 * Ends the program with status 1 if it has not finished in time, so that a broker that never
 * answers (for example to waitForConfirms()) fails the check instead of hanging it.
 */
public final class Watchdog {
    private Watchdog() {}

    public static void start(String name, int seconds) {
        Thread t = new Thread(() -> {
            try {
                Thread.sleep(seconds * 1000L);
            } catch (InterruptedException e) {
                return;
            }
            System.out.println("FAIL " + name + ": timed out after " + seconds + "s");
            System.out.flush();
            Runtime.getRuntime().halt(1);
        }, "watchdog");
        t.setDaemon(true);
        t.start();
        Thread.setDefaultUncaughtExceptionHandler((thread, e) -> {
            System.out.println("FAIL " + name + ": uncaught " + e + " in " + thread.getName());
            e.printStackTrace(System.out);
            System.out.flush();
            Runtime.getRuntime().halt(1);
        });
    }
}
