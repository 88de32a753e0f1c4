import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.MessageProperties;
import com.rabbitmq.client.ShutdownSignalException;
import java.io.IOException;
import java.nio.charset.StandardCharsets;

/**
 * Seed article, "开启事务机制": txSelect, basicPublish, txCommit; txRollback when the work
 * fails. Checks that a committed message is in the queue and a rolled-back one is not.
 *
 * Usage: java SeedTransactions HOST PORT
 */
public class SeedTransactions {
    static void check(boolean ok, String what) {
        System.out.println((ok ? "ok   " : "FAIL ") + "SeedTransactions: " + what);
        if (!ok) {
            System.exit(1);
        }
    }

    /** The article's executeTransaction, with the publish it describes in its comment. */
    private static void executeTransaction(Channel channel, String exchange, String routingKey,
            byte[] message, boolean failBeforeCommit) throws IOException {
        boolean transactionSuccess = false;
        try {
            // 开启事务
            channel.txSelect();

            // 执行一系列消息操作
            channel.basicPublish(exchange, routingKey, MessageProperties.PERSISTENT_TEXT_PLAIN, message);
            if (failBeforeCommit) {
                throw new IOException("simulated failure before commit");
            }
            // 提交事务
            channel.txCommit();
            transactionSuccess = true;
        } catch (ShutdownSignalException | IOException e) {
            // 回滚事务
            if (!transactionSuccess) {
                channel.txRollback();
            }
            throw e;
        }
    }

    public static void main(String[] args) throws Exception {
        Watchdog.start("SeedTransactions", 60);
        ConnectionFactory factory = new ConnectionFactory();
        factory.setHost(args[0]);
        factory.setPort(Integer.parseInt(args[1]));
        factory.setUsername("guest");
        factory.setPassword("guest");
        factory.setConnectionTimeout(10_000);
        String queue = "seed.tx." + System.nanoTime();

        try (Connection connection = factory.newConnection();
                Channel channel = connection.createChannel();
                Channel observer = connection.createChannel()) {
            channel.queueDeclare(queue, true, false, false, null);

            // 1. A committed transaction: the message is in the queue after txCommit.
            executeTransaction(channel, "", queue, "committed".getBytes(StandardCharsets.UTF_8), false);
            GetResponse got = observer.basicGet(queue, true);
            check(got != null, "after txCommit the message is in the queue");
            check("committed".equals(new String(got.getBody(), StandardCharsets.UTF_8)),
                    "the committed message has the published body");
            check(got.getProps().getDeliveryMode() != null && got.getProps().getDeliveryMode() == 2,
                    "the committed message is persistent (deliveryMode 2)");

            // 2. A publish inside the transaction is not visible before the commit.
            channel.basicPublish("", queue, MessageProperties.PERSISTENT_TEXT_PLAIN,
                    "pending".getBytes(StandardCharsets.UTF_8));
            check(observer.basicGet(queue, true) == null,
                    "an uncommitted publish is not in the queue before txCommit");
            channel.txCommit();
            got = observer.basicGet(queue, true);
            check(got != null && "pending".equals(new String(got.getBody(), StandardCharsets.UTF_8)),
                    "it is in the queue after txCommit");

            // 3. A failing transaction: the article's catch block calls txRollback.
            boolean threw = false;
            try {
                executeTransaction(channel, "", queue, "rolled-back".getBytes(StandardCharsets.UTF_8), true);
            } catch (IOException expected) {
                threw = true;
            }
            check(threw, "the failing transaction rethrew its exception after txRollback");
            check(observer.basicGet(queue, true) == null, "after txRollback the message is not in the queue");
            // Committing now must not resurrect the rolled-back publish.
            channel.txCommit();
            check(observer.basicGet(queue, true) == null,
                    "a txCommit after txRollback does not publish the rolled-back message");
            check(channel.isOpen(), "the transactional channel is still open");

            observer.queueDelete(queue);
        }
        System.out.println("PASS SeedTransactions");
        System.exit(0);
    }
}
