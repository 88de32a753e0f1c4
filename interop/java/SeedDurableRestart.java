import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.MessageProperties;
import java.nio.charset.StandardCharsets;

/**
 * Seed article, "消息持久化", the claim that follows the three snippets: "如果RabbitMQ收到消息后挂了，
 * 重启后会自行从磁盘上恢复消息". Run in two phases around a broker crash (SIGKILL) and restart:
 *
 *   java SeedDurableRestart HOST PORT before SUFFIX   declare, publish persistent, confirm
 *   (the caller kills and restarts the broker on the same data directory)
 *   java SeedDurableRestart HOST PORT after SUFFIX    the exchange, queue, binding and message are back
 *
 * run.sh does not run it on its own; the Rust test drives both phases (run.sh HOST PORT
 * SeedDurableRestart before SUFFIX).
 */
public class SeedDurableRestart {
    static void check(boolean ok, String what) {
        System.out.println((ok ? "ok   " : "FAIL ") + "SeedDurableRestart: " + what);
        if (!ok) {
            System.exit(1);
        }
    }

    public static void main(String[] args) throws Exception {
        Watchdog.start("SeedDurableRestart", 60);
        ConnectionFactory factory = new ConnectionFactory();
        factory.setHost(args[0]);
        factory.setPort(Integer.parseInt(args[1]));
        factory.setUsername("guest");
        factory.setPassword("guest");
        factory.setConnectionTimeout(10_000);
        String phase = args[2];
        String exchangeName = "seed.restart.x." + args[3];
        String queueName = "seed.restart.q." + args[3];
        String routingKey = "order.created";
        boolean durable = true;
        boolean exclusive = false;

        try (Connection connection = factory.newConnection();
                Channel channel = connection.createChannel()) {
            if (phase.equals("before")) {
                channel.exchangeDeclare(exchangeName, "direct", durable);
                channel.queueDeclare(queueName, durable, exclusive, false, null);
                channel.queueBind(queueName, exchangeName, routingKey);
                channel.confirmSelect();
                channel.basicPublish(exchangeName, routingKey, MessageProperties.PERSISTENT_TEXT_PLAIN,
                        "survives a crash".getBytes());
                check(channel.waitForConfirms(10_000), "the persistent message was confirmed before the crash");
                int count = channel.queueDeclarePassive(queueName).getMessageCount();
                check(count == 1, "it is in the durable queue (message count " + count + ")");
            } else if (phase.equals("after")) {
                channel.exchangeDeclarePassive(exchangeName);
                check(true, "the durable exchange exists after the restart");
                AMQP.Queue.DeclareOk ok = channel.queueDeclarePassive(queueName);
                check(ok.getMessageCount() == 1,
                        "the durable queue exists after the restart with the message (message count "
                                + ok.getMessageCount() + ")");
                GetResponse got = channel.basicGet(queueName, false);
                check(got != null && "survives a crash".equals(new String(got.getBody(), StandardCharsets.UTF_8)),
                        "the persistent message can be consumed after the restart");
                Integer mode = got.getProps().getDeliveryMode();
                check(mode != null && mode == 2 && "text/plain".equals(got.getProps().getContentType()),
                        "it kept its properties (deliveryMode " + mode + ", contentType "
                                + got.getProps().getContentType() + ")");
                channel.basicAck(got.getEnvelope().getDeliveryTag(), false);
                check(channel.basicGet(queueName, false) == null, "it was there exactly once");

                // The binding survived too: a new publish through the exchange is routed.
                channel.confirmSelect();
                channel.basicPublish(exchangeName, routingKey, MessageProperties.PERSISTENT_TEXT_PLAIN,
                        "after restart".getBytes());
                check(channel.waitForConfirms(10_000), "a publish after the restart is confirmed");
                got = channel.basicGet(queueName, true);
                check(got != null && "after restart".equals(new String(got.getBody(), StandardCharsets.UTF_8)),
                        "the binding survived: it was routed to the queue");

                channel.queueDelete(queueName);
                channel.exchangeDelete(exchangeName);
            } else {
                check(false, "phase is 'before' or 'after' (got " + phase + ")");
            }
        }
        System.out.println("PASS SeedDurableRestart " + phase);
        System.exit(0);
    }
}
